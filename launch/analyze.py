#!/usr/bin/env python
"""Write a sweep's report from its parquet files: tables (markdown + csv) and PNG plots.

    python launch/analyze.py results/digits_lt-default-20261124-101500

Reads only <output-dir>/results.parquet and metrics.parquet (so it works on a sweep that is still
running) and writes <output-dir>/report/: report.md, best_per_ratio, summary, delta, status
(.md and .csv), acc_vs_rho.png, delta_bars.png, per_class_acc.png, learning_curves.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltssl.report import analyze  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/analyze.py", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", type=Path, help="the sweep folder (holds results.parquet)")
    p.add_argument("--report-dir", type=Path, help="where to write the report; default <output_dir>/report")
    args = p.parse_args(argv)
    try:
        folder = analyze(args.output_dir, args.report_dir)
    except FileNotFoundError as error:
        print(f"analyze: {error}", file=sys.stderr)
        return 2
    print(f"report: {folder / 'report.md'}")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
