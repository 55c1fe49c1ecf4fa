"""python -m parityrt.train score [Hydra overrides]: rescore rollouts with the trainer (parityrt/train/score.py)."""

from __future__ import annotations

import sys

from parityrt.config import compose_run
from parityrt.train.score import RecordError, main

COMMANDS = {"score": main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m parityrt.train {{{'|'.join(COMMANDS)}}} [Hydra overrides]")
    try:
        COMMANDS[sys.argv[1]](compose_run(sys.argv[2:]))
    except (RecordError, ValueError) as e:
        sys.exit(f"error: {e}")
