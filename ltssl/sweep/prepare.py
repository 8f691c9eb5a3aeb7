"""Checks and dataset preparation before a sweep's first trial: run once, in a child process.

``python -m ltssl.sweep.prepare <configs.json> [--no-prepare] [--no-check-names]`` reads a JSON list of resolved training configs,
runs :func:`ltssl.launch.preflight` on each distinct job shape (names, dataset, partition,
resources) and :func:`ltssl.data.prepare_dataset` on each distinct data section, then prints one
JSON line per dataset (``{"data": ..., "n_train": ..., "root": ...}``). A refusal exits with
status 2 and one line on stderr naming the key; nothing has been submitted.

A child process because the checks import the trainer's registries, i.e. torch (its memory and
its import time): the driver stays small for the whole sweep.
"""

from __future__ import annotations

import json
import sys

from ltssl.config import ConfigError, load_config
from ltssl.data import DataError, prepare_dataset
from ltssl.launch import LaunchError, preflight


def _key(tree: dict, sections: tuple) -> str:
    return json.dumps({s: tree.get(s) for s in sections}, sort_keys=True, default=str)


def check_and_prepare(configs: list[dict], *, prepare: bool = True, check_names: bool = True) -> list[dict]:
    """Preflight every distinct job shape, prepare every distinct dataset; raise on the first refusal."""
    seen_jobs, seen_data, prepared = set(), set(), []
    for tree in configs:
        cfg = load_config(tree)
        job_key = _key({**tree, "batch": tree["train"]["batch_size"]}, ("data", "model", "method", "launch", "tracking", "batch"))
        if job_key not in seen_jobs:
            seen_jobs.add(job_key)
            preflight(cfg, check_names=check_names)
        data_key = _key(tree, ("data",))
        if prepare and data_key not in seen_data:
            seen_data.add(data_key)
            ds = prepare_dataset(cfg.data)
            prepared.append({"data": tree["data"], "n_train": ds.n_train, "root": str(ds.root),
                             "class_counts": list(ds.class_counts)})
    return prepared


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = {a for a in argv[1:]}
    if not argv or not flags <= {"--no-prepare", "--no-check-names"}:
        print("usage: python -m ltssl.sweep.prepare <configs.json> [--no-prepare] [--no-check-names]", file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        configs = json.load(fh)
    try:
        prepared = check_and_prepare(configs, prepare="--no-prepare" not in flags,
                                     check_names="--no-check-names" not in flags)
    except (LaunchError, DataError, ConfigError) as error:  # one line each, by contract
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        print(lines[0] if lines else type(error).__name__, file=sys.stderr)
        return 2
    for item in prepared:
        print(json.dumps(item))
    return 0


if __name__ == "__main__":
    sys.exit(main())
