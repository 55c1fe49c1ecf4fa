"""python -m parityrt.server: the same launcher as python -m parityrt.serve."""

from parityrt.serve import main

if __name__ == "__main__":
    main()
