"""python -m parityrt.parity compare RUN_A RUN_B [--out DIR] | unique RUN [RUN ...]

compare: A is the reference. Prints a Markdown table; with --out also writes compare.json and compare.md there.
unique:  distinct outputs per prompt over N runs of the same requests (1.0 = every run produced the same tokens).
Bad input (missing run directory, runs of different prompts, ...) ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parityrt.parity.compare import compare_runs
from parityrt.parity.io import RunError, check_same_prompts, load_run
from parityrt.parity.metrics import unique_outputs
from parityrt.parity.render import compare_markdown, markdown_table


def _compare(args: argparse.Namespace) -> None:
    result = compare_runs(args.run_a, args.run_b, rescore=not args.no_rescore, batch_size=args.batch_size,
                          progress=not args.quiet)
    text = compare_markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=1))
        (out / "compare.md").write_text(text)
        print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}", file=sys.stderr)


def _unique(args: argparse.Namespace) -> None:
    runs = [load_run(p, with_logits=False) for p in args.runs]
    for other in runs[1:]:
        check_same_prompts(runs[0], other)
    rows = [(rid, unique_outputs([r.records[rid].output_ids for r in runs])) for rid in runs[0].records]
    print(markdown_table(["request", f"unique outputs over {len(runs)} runs"], rows))
    print(f"mean: {sum(n for _, n in rows) / len(rows):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parityrt.parity", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="drift of run B against reference run A")
    c.add_argument("run_a", help="reference run directory")
    c.add_argument("run_b", help="candidate run directory")
    c.add_argument("--out", help="directory for compare.json and compare.md")
    c.add_argument("--no-rescore", action="store_true",
                   help="compare the records only (no model is built; no teacher-forced or routing metrics)")
    c.add_argument("--batch-size", type=int, default=1, help="sequences per forward when rescoring")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare)
    u = sub.add_parser("unique", help="unique outputs per prompt over N runs")
    u.add_argument("runs", nargs="+", help="run directories of the same requests")
    u.set_defaults(func=_unique)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
