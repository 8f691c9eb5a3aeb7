#!/usr/bin/env python
"""Run one training job, locally or on Slurm, and print where its outputs are and its final metrics.

    python launch/train.py --config sweeps/digits_lt/train.yaml                  # locally
    python launch/train.py --config sweeps/digits_lt/train.yaml --partition cpu  # on Slurm
    python launch/train.py --config cfg.yaml optim.rho=2 train.epochs=5          # overrides

A bad configuration, or a job the cluster cannot host (preflight), is a one-line error and exit
status 2, before anything is submitted. A failed job prints its remote traceback (exit 1). Ctrl-C
while waiting cancels the job (exit 130); ``--detach`` submits and returns at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from ltssl.config import ConfigError, load_config, parse_override  # noqa: E402
from ltssl.launch import JobCancelledError, JobFailedError, LaunchError, submit  # noqa: E402
from ltssl.launch.job import DEFAULT_TARGET  # noqa: E402

PROG = "train.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run one ltssl training job locally (submitit's local executor) or on a Slurm partition.",
        epilog="Overrides are section.key=value pairs read as YAML, applied after the config file: "
        "optim.rho=2 data.imbalance_ratio=100 launch.gpus_per_node=4",
    )
    parser.add_argument("--config", metavar="YAML", help="configuration file (any subset of the sections); default: built-in defaults")
    parser.add_argument(
        "--partition",
        metavar="NAME",
        help="submit to this Slurm partition (sets launch.partition); default: the config's, and without one, run locally",
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="the run folder (config.yaml, job.json, metrics.jsonl, checkpoints/, result.json, submitit/ logs); "
        "default: runs/<config name>-<method>-<time>",
    )
    parser.add_argument("--method", metavar="NAME", help="SSL method (sets method.name), e.g. simsiam, simclr, moco_v2, supervised")
    parser.add_argument("--detach", action="store_true", help="submit, print the job id and run folder, and return without waiting")
    parser.add_argument("--target", default=DEFAULT_TARGET, help=argparse.SUPPRESS)  # tests: another "module:function"
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="configuration overrides")
    return parser


def fail(message: str, status: int) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(status)


def print_result(result: dict, run_dir: Path) -> None:
    print("final metrics:")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"  {key}: {value:.4f}")
        elif isinstance(value, (int, str, bool)) or value is None:
            print(f"  {key}: {value}")
        elif isinstance(value, list) and len(value) <= 20:
            print(f"  {key}: {json.dumps(value if not all(isinstance(v, float) for v in value) else [round(v, 4) for v in value])}")
    if (run_dir / "result.json").exists():
        print(f"result: {run_dir / 'result.json'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may stand before and after the flags
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        if args.partition is not None:
            overrides["launch.partition"] = args.partition
        if args.method is not None:
            overrides["method.name"] = args.method
        cfg = load_config(args.config, overrides)
    except ConfigError as error:
        fail(str(error), 2)
    if args.output_dir:
        run_dir = Path(args.output_dir)
    else:
        stem = Path(args.config).stem if args.config else "defaults"
        run_dir = REPO / "runs" / f"{stem}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        handle = submit(cfg, run_dir, target=args.target)
    except LaunchError as error:
        fail(str(error), 2)
    where = f"Slurm partition {cfg.launch.partition}" if cfg.launch.partition else "local executor"
    print(f"job {handle.job_id} submitted ({where})")
    print(f"run folder: {handle.run_dir}")
    print(f"  logs: {handle.folder}   metrics: {handle.metrics_path}")
    sys.stdout.flush()
    if args.detach:
        return 0
    try:
        result = handle.result()
    except KeyboardInterrupt:
        handle.cancel()
        print(f"\n{PROG}: interrupted: job {handle.job_id} cancelled", file=sys.stderr)
        return 130
    except JobCancelledError as error:
        fail(str(error), 1)
    except JobFailedError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"job {handle.job_id} finished on {handle.node_list}")
    if isinstance(result, dict):
        print_result(result, handle.run_dir)
    else:
        print(f"result: {result!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
