#!/usr/bin/env python
"""The sweep driver's own cost: time per trial and memory, with jobs that do nothing.

Runs sweeps whose every trial is a Slurm job on the local cluster running the launch layer's toy
trainer with zero steps (``ltssl.launch.toy:train``: it writes its result and returns), so what is
measured is the driver: its loop (Tune's searcher and scheduler), submission, tailing, completion,
bookkeeping.

Per trial, from the sweep ledger's status times and the job's own record (run_dir/job.json):

- ``driver_submit_s``: the driver starts the trial (a slot of ``max_concurrent`` is its) -> job
  submitted (ledger, sbatch);
- ``slurm_queue_s``: job submitted -> its Python process started (Slurm's scheduling, the node's
  process start-up and submitit's import: not the driver's);
- ``job_run_s``: job started -> job function returned (the toy trainer: nothing);
- ``driver_complete_s``: job function returned -> trial recorded (result detected, ledger,
  results.parquet rewritten);
- ``driver_s`` = ``driver_submit_s + driver_complete_s``: the driver's time per trial beyond
  Slurm's own scheduling. Goal: under 2 s.

Wall times depend on what else runs on the machine (the 1-minute load average is recorded); the
CPU seconds the driver and its Ray processes use per trial do not, much.

Memory: the driver process's RSS (the Python process running the sweep) and the total PSS of the
driver plus every Ray process it started (GCS, raylet, dashboard, agents), sampled every 0.25 s,
for a sweep of 100 trials queued at once, at two concurrencies: a trial is not a process (the
driver follows every job itself), so the total should not grow with ``max_concurrent``.

    .venv/bin/python benchmarks/sweep_overhead.py            # writes benchmarks/results/sweep_overhead.json

(brings the local cluster up when ``SLURM_CONF`` is not set: ``slurm/local-cluster up`` and its env)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ltssl.launch import slurm  # noqa: E402  (after the path insert)
from ltssl.sweep import run_sweep  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "sweep_overhead.json"
NOOP_TARGET = "ltssl.launch.toy:train"


def sweep_yaml(folder: Path, n: int, max_concurrent: int) -> Path:
    path = folder / f"noop-{n}-{max_concurrent}.yaml"
    path.write_text(json.dumps({
        "name": f"noop-{n}",
        "base": {"data": {"dataset": "digits", "cache_dir": str(folder / "data")}, "train": {"epochs": 1},
                 "launch": {"timeout_min": 10, "signal_delay_s": 30, "mem_gb": 0.5}},
        "grid": {"seed": list(range(n))},
        "max_concurrent": max_concurrent,
        "max_trials": max(n, 1),
        "poll_interval_s": 0.2,
    }))
    return path


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ray_pids(ray_tmpdir: str) -> list[int]:
    """Every process the driver started, directly or not: Ray's GCS, raylet, dashboard and its
    agents, and any Ray worker (children of the raylet). Slurm jobs are not among
    them (slurmd starts those)."""
    try:
        return [p.pid for p in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


class MemorySampler(threading.Thread):
    def __init__(self, ray_tmpdir: str, period: float = 0.25):
        super().__init__(daemon=True)
        self.ray_tmpdir = ray_tmpdir
        self.period = period
        self.stop_event = threading.Event()
        self.driver_rss_max = 0
        self.total_pss_max = 0
        self.processes_max = 0
        self.cpu_seen: dict[int, float] = {}   # pid -> last user+system CPU seconds seen
        self.load: list[float] = []

    def run(self) -> None:
        start_cpu = psutil.Process().cpu_times()
        self.cpu_driver_start = start_cpu.user + start_cpu.system
        while not self.stop_event.is_set():
            driver = _rss(os.getpid())
            pids = _ray_pids(self.ray_tmpdir)
            total = _pss(os.getpid()) + sum(_pss(p) for p in pids)
            self.driver_rss_max = max(self.driver_rss_max, driver)
            self.total_pss_max = max(self.total_pss_max, total)
            self.processes_max = max(self.processes_max, len(pids) + 1)
            for pid in pids:
                try:
                    t = psutil.Process(pid).cpu_times()
                    self.cpu_seen[pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.load.append(os.getloadavg()[0])
            self.stop_event.wait(self.period)

    def cpu_seconds(self) -> float:
        """CPU seconds used by the driver and every process it started (as last sampled)."""
        t = psutil.Process().cpu_times()
        return (t.user + t.system - self.cpu_driver_start) + sum(self.cpu_seen.values())


def trial_times(output_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((output_dir / "ledger").glob("t*.json")):
        record = json.loads(path.read_text())
        history: dict[str, float] = {}
        for event, t in record.get("history", []):
            history.setdefault(event, t)  # the first time of each event
        run_dir = Path(record["run_dir"])
        job = json.loads((run_dir / "job.json").read_text())
        started = job["attempts"][-1]["started"]
        if "finished" not in job:
            # submit() rewrites job.json after sbatch returns; a job that is already over by then
            # loses its "finished" stamp: take the time of its last metrics line instead
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            job["finished"] = json.loads(lines[-1])["time"]
        rows.append({
            "trial": record["trial_id"],
            "status": record["status"],
            "driver_submit_s": job["submitted"] - history["started"],
            "waiting_for_a_slot_s": history["started"] - history["pending"],
            "slurm_queue_s": started - job["submitted"],
            "job_run_s": job["finished"] - started,
            "driver_complete_s": history[record["status"]] - job["finished"],
            "trial_total_s": history[record["status"]] - history["started"],
            "_started_at": history["started"],
            "_ended_at": history[record["status"]],
        })
    for row in rows:
        row["driver_s"] = row["driver_submit_s"] + row["driver_complete_s"]
    return rows


def summarise(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": round(statistics.median(values), 3), "p90": round(values[int(0.9 * (len(values) - 1))], 3),
            "max": round(values[-1], 3), "mean": round(statistics.fmean(values), 3)}


def run_one(folder: Path, label: str, n: int, max_concurrent: int, dashboard: bool) -> dict:
    out = folder / f"out-{label}"
    sampler = MemorySampler(os.environ["RAY_TMPDIR"])
    sampler.start()
    started = time.time()
    with open(folder / f"log-{label}.txt", "w") as log:
        outcome = run_sweep(sweep_yaml(folder, n, max_concurrent), partition="cpu", output_dir=out, dashboard=dashboard,
                            target=NOOP_TARGET, target_kwargs={"steps": 0}, prepare=False, analyze=False,
                            console=Console(file=log, width=120), live=False)
    wall = time.time() - started
    sampler.stop_event.set()
    sampler.join()
    rows = trial_times(out)
    completed = [r for r in rows if r["status"] == "completed"]
    if len(completed) != n:
        raise SystemExit(f"{n - len(completed)} of {n} trials did not complete: see {out}")
    jobs = [json.loads(p.read_text())["job_ids"] for p in (out / "ledger").glob("t*.json")]
    if any(len(j) != 1 for j in jobs):
        raise SystemExit(f"a trial submitted more than one job: see {out}")
    span = max(r["_ended_at"] for r in rows) - min(r["_started_at"] for r in rows)
    edges = sorted([(r["_started_at"], 1) for r in rows] + [(r["_ended_at"], -1) for r in rows])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return {
        "trials": n,
        "max_concurrent": max_concurrent,
        # how many trials actually ran at once (Ray starting its worker processes bounds it early on)
        "running_trials_mean": round(sum(r["trial_total_s"] for r in rows) / span, 2),
        "running_trials_max": peak,
        "dashboard": dashboard,
        "sweep_wall_s": round(wall, 2),
        "sweep_wall_per_trial_s": round(wall / n, 3),
        # load-independent: CPU time of the driver and Ray (start-up included)
        "driver_and_ray_cpu_s": round(sampler.cpu_seconds(), 2),
        "driver_and_ray_cpu_s_per_trial": round(sampler.cpu_seconds() / n, 3),
        "load_average_1min_mean": round(statistics.fmean(sampler.load), 2) if sampler.load else None,
        "per_trial_s": {k: summarise([r[k] for r in completed]) for k in
                        ("driver_s", "driver_submit_s", "driver_complete_s", "slurm_queue_s", "job_run_s", "trial_total_s",
                         "waiting_for_a_slot_s")},
        "memory": {
            "driver_rss_max_mb": round(sampler.driver_rss_max / 2**20, 1),
            "driver_and_ray_pss_max_mb": round(sampler.total_pss_max / 2**20, 1),
            "processes_max": sampler.processes_max,
        },
    }


def _local_cluster() -> bool:
    """Bring the local Slurm cluster up (idempotent) and take its environment (``make bench``).

    Returns whether this call started it (then :func:`main` takes it down at the end).
    """
    script = REPO / "slurm" / "local-cluster"
    was_up = subprocess.run([str(script), "status"], capture_output=True).returncode == 0
    up = subprocess.run([str(script), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        raise SystemExit(f"slurm/local-cluster up failed:\n{up.stdout}\n{up.stderr}")
    env = subprocess.run([str(script), "env"], capture_output=True, text=True, check=True).stdout
    for line in env.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            os.environ[key] = shlex.split(value)[0] if value else ""
    return not was_up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100, help="trials of the memory sweep (queued at once)")
    p.add_argument("--timing-trials", type=int, default=40, help="trials of the timing sweep")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32],
                   help="max_concurrent values of the memory sweeps")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    started = _local_cluster() if not os.environ.get("SLURM_CONF") else False
    try:
        return measure(args)
    finally:
        if started:  # leave the machine as it was
            subprocess.run([str(REPO / "slurm" / "local-cluster"), "down"], capture_output=True)


def measure(args: argparse.Namespace) -> int:
    if "cpu" not in slurm.partitions():
        raise SystemExit("the local cluster has no partition cpu")
    os.environ["RAY_TMPDIR"] = f"/tmp/ltr-bench-{os.getpid()}"
    folder = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %m"], capture_output=True, text=True).stdout.split()
    sched = next((line for line in Path(os.environ["SLURM_CONF"]).read_text().splitlines()
                  if line.startswith("SchedulerParameters")), "")
    runs = {"timing": run_one(folder, "timing", args.timing_trials, 8, dashboard=False)}
    for mc in args.concurrency:
        label = f"memory_{args.trials}_trials_concurrency_{mc}"
        runs[label] = run_one(folder, label, args.trials, mc, dashboard=True)
    load = os.getloadavg()
    result = {
        "benchmark": "sweep_overhead",
        "what": "driver time per trial and driver memory, for trials whose Slurm job does nothing "
                f"({NOOP_TARGET} with steps=0) on the local one-node Slurm cluster, partition cpu",
        "goal": {"driver_s_per_trial_below": 2.0, "driver_memory_mb_below": 1024},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "slurm_node": sinfo,
                    "slurm_scheduler": sched, "load_average_at_end": [round(x, 2) for x in load]},
        "runs": runs,
        "command": "eval \"$(slurm/local-cluster env)\" && .venv/bin/python benchmarks/sweep_overhead.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    timing = runs["timing"]["per_trial_s"]["driver_s"]
    result["verdict"] = {
        "driver_s_median": timing["median"],
        "driver_s_p90": timing["p90"],
        "time_goal_met": timing["median"] < 2.0,
        "driver_rss_max_mb": max(r["memory"]["driver_rss_max_mb"] for r in runs.values()),
        "driver_memory_goal_met": all(r["memory"]["driver_rss_max_mb"] < 1024 for r in runs.values()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(json.dumps(result["verdict"], indent=2))
    for name, run in runs.items():
        print(name, json.dumps({"wall_per_trial_s": run["sweep_wall_per_trial_s"], **{k: v["median"] for k, v in run["per_trial_s"].items()},
                                **run["memory"]}))
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
