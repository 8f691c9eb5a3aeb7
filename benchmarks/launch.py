#!/usr/bin/env python
"""Measure the local cluster and the launch layer: bring-up, teardown, submission-to-start, cancel.

    .venv/bin/python benchmarks/launch.py [--jobs 5]      # writes benchmarks/results/launch.json

Uses a cluster of its own (state folder ``$LTSSL_BENCH_CLUSTER_DIR``, default
/tmp/ltssl-bench-cluster) so that it never disturbs a cluster in use; brings it up from nothing
(twice: the second time MariaDB's files are cached), runs toy jobs (``ltssl.launch.toy``, no
torch in the job) and tears it down. Prints one JSON object (seconds) and writes it to ``--out``
(default ``benchmarks/results/launch.json``).

Submission-to-start is measured two ways: until squeue says RUNNING, and until the job's own
code runs (the first attempt recorded in job.json: includes the Python start-up of the task).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLUSTER = REPO / "slurm" / "local-cluster"

# after the sys.path line: the benchmark runs from a checkout
from ltssl.config import load_config  # noqa: E402
from ltssl.io import atomic_write_text  # noqa: E402
from ltssl.launch import JobCancelledError, submit  # noqa: E402


def timed(args: list[str], env: dict) -> float:
    start = time.monotonic()
    subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return time.monotonic() - start


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3), "n": len(values)}


def first_attempt_started(run_dir: Path) -> float | None:
    try:
        return json.loads((run_dir / "job.json").read_text())["attempts"][0]["started"]
    except (FileNotFoundError, KeyError, IndexError, json.JSONDecodeError):
        return None


def measure_jobs(partition: str | None, jobs: int, work: Path) -> dict:
    launch = {"timeout_min": 10, "signal_delay_s": 30, "mem_gb": 1}
    if partition:
        launch["partition"] = partition
    cfg = load_config({"launch": launch})
    submit_call, to_running, to_code, to_result = [], [], [], []
    for i in range(jobs):
        run_dir = work / f"{partition or 'local'}-{i}"
        t0 = time.time()
        handle = submit(cfg, run_dir, target="ltssl.launch.toy:train", target_kwargs={"steps": 1, "step_s": 0.0})
        submit_call.append(time.time() - t0)
        while handle.state == "PENDING":
            time.sleep(0.02)
        to_running.append(time.time() - t0)
        handle.result(timeout=120)
        to_result.append(time.time() - t0)
        to_code.append(first_attempt_started(run_dir) - t0)
    return {
        "submit_call_s": summary(submit_call),
        "submit_to_running_s": summary(to_running),
        "submit_to_job_code_s": summary(to_code),
        "submit_to_result_s": summary(to_result),
    }


def measure_cancel(work: Path) -> dict:
    cfg = load_config({"launch": {"partition": "cpu", "timeout_min": 10, "signal_delay_s": 30, "mem_gb": 1}})
    handle = submit(cfg, work / "cancel", target="ltssl.launch.toy:train", target_kwargs={"steps": 10**6, "step_s": 0.05})
    while not (work / "cancel" / "metrics.jsonl").exists():
        time.sleep(0.05)
    t0 = time.time()
    handle.cancel()
    cancel_call = time.time() - t0
    try:
        handle.result()
    except JobCancelledError:
        pass
    to_error = time.time() - t0
    while True:
        out = subprocess.run(["squeue", "-h", "-j", handle.job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if out in ("", "CANCELLED"):
            break
        time.sleep(0.05)
    return {"cancel_call_s": round(cancel_call, 3), "cancel_to_error_s": round(to_error, 3), "cancel_to_left_queue_s": round(time.time() - t0, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="jobs per executor for the latency figures")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "launch.json"), help="where the JSON goes")
    args = parser.parse_args()
    cluster_dir = os.environ.get("LTSSL_BENCH_CLUSTER_DIR", "/tmp/ltssl-bench-cluster")
    env = dict(os.environ, LTSSL_CLUSTER_DIR=cluster_dir)
    results: dict = {"machine": {"cores": os.cpu_count(), "load_avg_1min_at_start": os.getloadavg()[0]}}
    subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True)
    ups, downs = [], []
    try:
        for _ in range(2):
            ups.append(timed([str(CLUSTER), "up"], env))
            results["up_when_already_up_s"] = round(timed([str(CLUSTER), "up"], env), 3)
            downs.append(timed([str(CLUSTER), "down"], env))
        results["up_from_nothing_s"] = [round(x, 2) for x in ups]
        results["down_s"] = [round(x, 2) for x in downs]
        timed([str(CLUSTER), "up"], env)
        env_out = subprocess.run([str(CLUSTER), "env"], env=env, capture_output=True, text=True, check=True).stdout
        for line in env_out.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            os.environ[key] = value
        with tempfile.TemporaryDirectory(prefix="ltssl-bench-") as work:
            results["slurm"] = measure_jobs("cpu", args.jobs, Path(work))
            results["local"] = measure_jobs(None, args.jobs, Path(work))
            results["slurm_cancel"] = measure_cancel(Path(work))
    finally:
        subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True)
    results["machine"]["load_avg_1min_at_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
