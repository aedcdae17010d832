"""``python -m raymoe.benchmarks.results_md [--check] [--results FILE]``: render every marked block."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from raymoe.benchmarks.results_md import RESULTS_DIR, RenderError, render_document

RESULTS_MD = RESULTS_DIR.parent / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the tables of benchmarks/RESULTS.md from "
                                                 "benchmarks/results/*.json.")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="the markdown file (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 and print the diff if a "
                                                             "block differs from what its JSON renders to")
    args = parser.parse_args(argv)
    text = args.results.read_text()
    try:
        rendered = render_document(text)
    except RenderError as exc:
        print(f"{args.results}: {exc}", file=sys.stderr)
        return 2
    if rendered == text:
        print(f"{args.results}: every block matches its JSON", file=sys.stderr)
        return 0
    if args.check:
        sys.stderr.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                   str(args.results), "rendered from benchmarks/results"))
        print(f"\n{args.results}: blocks differ from their JSON; run python -m raymoe.benchmarks.results_md", file=sys.stderr)
        return 1
    args.results.write_text(rendered)
    print(f"{args.results}: blocks rendered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
