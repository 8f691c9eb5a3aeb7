"""Pre-flight checks of a sweep's jobs before anything is submitted: one line on a refusal.

The quick checks (dataset folders, partition, resources) run in the driver at once; the trainer's
name checks (they import the trainer's registries, i.e. torch) and the dataset preparation run in
a child process (:mod:`ltssl.sweep.prepare`) that overlaps with Ray's start-up, so the driver
stays small for the whole sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ltssl.launch import LaunchError
from ltssl.launch.local import child_env
from ltssl.sweep.prepare import check_and_prepare
from ltssl.sweep.spec import SweepError


def quick_preflight(configs: list[dict]) -> None:
    """:func:`ltssl.launch.preflight` of every job shape, without the trainer's name checks."""
    try:
        check_and_prepare(configs, prepare=False, check_names=False)
    except LaunchError as error:
        raise SweepError(str(error).strip().splitlines()[0]) from None


def check_jobs(configs: list[dict], prepare: bool, check_names: bool = True) -> list[dict]:
    """Preflight and dataset preparation in a child process; SweepError with its one line.

    Returns one ``{"data": ..., "n_train": ..., "root": ..., "class_counts": ...}`` per prepared dataset.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(configs, fh)
        path = fh.name
    try:
        cmd = [sys.executable, "-m", "ltssl.sweep.prepare", path] + ([] if prepare else ["--no-prepare"])
        cmd += [] if check_names else ["--no-check-names"]
        # env=: a copy made here; without it the exec reads libc's live environ, which Ray's threads
        # (starting meanwhile) may free under it: "OSError: [Errno 14] Bad address" (local.child_env)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd(), env=child_env())
    finally:
        os.unlink(path)
    if proc.returncode == 2:
        raise SweepError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "preflight failed")
    if proc.returncode != 0:
        raise RuntimeError(f"dataset preparation crashed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
