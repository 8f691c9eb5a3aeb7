#!/usr/bin/env python
"""Run a hyperparameter sweep: Ray Tune here, one training job per trial (Slurm or local).

    python launch/sweep.py                                    # the default digits-LT sweep, local jobs
    python launch/sweep.py --config sweeps/cifar10_lt/rwsam.yaml --partition gpu
    python launch/sweep.py --resume --output-dir results/cifar10_lt-rwsam-20261124-101500

Results: <output-dir>/results.parquet (one row per trial, rewritten as trials finish) and
metrics.parquet; at the end the results table is printed and the report written to
<output-dir>/report/ (python launch/analyze.py <output-dir> rewrites it at any time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltssl.sweep.checks import quick_preflight  # noqa: E402
from ltssl.sweep.driver import DEFAULT_SWEEP, run_sweep  # noqa: E402
from ltssl.sweep.folder import with_tracking  # noqa: E402
from ltssl.sweep.spec import SweepError, load_sweep  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog="Ctrl-C cancels the running jobs (continue later with --resume); SIGTERM leaves them running "
        "and --resume re-attaches to them, as it does when the driver's Ray dies (exit status 75).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="SWEEP.yaml",
                   help="the sweep definition (sweeps/<dataset>/<name>.yaml); default sweeps/digits_lt/default.yaml")
    p.add_argument("--partition", metavar="NAME",
                   help="Slurm partition every trial's job is submitted to; absent: each job runs locally "
                   "(submitit's local executor) on this machine")
    p.add_argument("--output-dir", metavar="DIR", type=Path,
                   help="the sweep folder (ledger, trial folders, results.parquet, report/); "
                   "default results/<sweep name>-<timestamp>")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep in --output-dir (default: the newest results/<name>-* of "
                   "--config): finished trials are kept, running jobs re-attached, the rest resubmitted on "
                   "their own folder so they resume from their checkpoints")
    p.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=None,
                   help="start Ray's dashboard on 127.0.0.1 (token authentication on) and print how to reach it "
                   "through ssh; default on with --partition, off for local runs")
    p.add_argument("--dashboard-port", type=int, default=8265, metavar="PORT",
                   help="preferred dashboard port (a free one is taken when it is busy); default 8265")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="at most N trials (jobs) at once; default: the sweep's max_concurrent")
    p.add_argument("--target", metavar="MODULE:FUNCTION",
                   help="the function each job runs as function(cfg, run_dir); default ltssl.train:train "
                   "(a resumed sweep keeps the one it started with)")
    p.add_argument("--wandb", metavar="PROJECT",
                   help="log every trial to this Weights & Biases project (tracking.wandb_project; a new sweep "
                   "only: a resumed one keeps the trackers it started with)")
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="log every trial to MLflow (tracking.mlflow), at URI when given (tracking.mlflow_uri; "
                   "default the file store <output-dir>/mlruns); a new sweep only")
    p.add_argument("--dry-run", action="store_true",
                   help="check the sweep, every trial config and job (datasets, partition, resources), "
                   "print the trials, start nothing")
    p.add_argument("--no-analyze", dest="analyze", action="store_false",
                   help="do not write the report at the end")
    return p


def tracking_of(args: argparse.Namespace) -> dict:
    """The ``tracking`` settings that ``--wandb`` and ``--mlflow`` ask for (empty without them)."""
    tracking: dict = {}
    if args.wandb is not None:
        tracking["wandb_project"] = args.wandb
    if args.mlflow is not None:
        tracking["mlflow"] = True
        if args.mlflow:
            tracking["mlflow_uri"] = args.mlflow
    return tracking


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    tracking = tracking_of(args)
    try:
        if args.dry_run:
            spec = with_tracking(load_sweep(args.config or DEFAULT_SWEEP), tracking)
            trials = spec.validate_trials(args.partition)
            quick_preflight([t.config for t in trials])  # what a real start refuses, refused here too
            print(f"sweep {spec.name}: {len(trials)} trials, metric {spec.metric} ({spec.mode}), "
                  f"scheduler {spec.scheduler.name}, search {spec.search.algorithm}")
            for t in trials:
                shown = " ".join(f"{k}={v}" for k, v in t.params.items())
                print(f"  {t.trial_id} [{t.group}] {shown}")
            return 0
        outcome = run_sweep(
            args.config,
            partition=args.partition,
            output_dir=args.output_dir,
            resume=args.resume,
            dashboard=args.dashboard,
            dashboard_port=args.dashboard_port,
            max_concurrent=args.max_concurrent,
            analyze=args.analyze,
            target=args.target,
            tracking=tracking,
        )
    except SweepError as error:
        print(f"sweep: {error}", file=sys.stderr)
        return 2
    if outcome.interrupted == "detached":
        return 143
    if outcome.interrupted == "cancelled":
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
