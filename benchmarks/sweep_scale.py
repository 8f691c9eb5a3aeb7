#!/usr/bin/env python
"""A sweep at scale on the local Slurm: Slurm calls per second, memory, driver CPU per trial, latency.

Every trial is a Slurm job of the launch layer's toy trainer (``ltssl.launch.toy:train``): a no-op
job (0 steps) or a 60-s job (12 steps of 5 s, one metrics line per step). The local cluster is
brought up in a folder of its own with ``LTSSL_CLUSTER_CPUS`` raised so that every job of a run can
run at once, and Slurm's client commands (squeue, sacct, sbatch, scancel) are counted through PATH
wrappers that log each call. Figures, per run:

- ``slurm_calls``: calls of each command, and ``squeue+sacct`` per second over the steady state
  (every trial of the run in flight: from the last submission to the first job's end) and over
  the whole run;
- ``memory``: largest PSS of this process (the driver) plus every process it started (Ray: GCS,
  raylet, dashboard, the monitor, the trial actors), sampled every 0.25 s;
- ``driver_cpu_s_per_trial``: CPU seconds of the driver process per finished trial: over the whole
  run, from the first trial's end to the last (start-up left out: this is what is compared between
  the small and the large sweep), and over the first and last quarter of finished trials (flat
  cost: the two should agree); ``driver_and_ray_cpu_s_per_trial`` adds every Ray process;
- ``line_to_recorded_s``: from a job's last metrics line (its ``time``) to the trial recorded
  complete in the sweep ledger by the driver's Tune callback (Tune has seen the line before that).

The 1-minute load average is recorded with each run: the machine is shared.

    .venv/bin/python benchmarks/sweep_scale.py      # writes benchmarks/results/sweep_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
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

from benchmarks.sweep_overhead import _pss, summarise  # noqa: E402  (after the path insert)
from ltssl.sweep import run_sweep  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "sweep_scale.json"
CLUSTER_DIR = "/tmp/ltssl-sweep-scale"
TARGET = "ltssl.launch.toy:train"
COUNTED = ("squeue", "sacct", "sbatch", "scancel")


def slurm_wrappers(folder: Path) -> tuple[Path, Path]:
    """A PATH folder whose squeue/sacct/sbatch/scancel log ``name time`` to a file, then run the real one."""
    bin_dir, log = folder / "bin", folder / "slurm-calls.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in COUNTED:
        real = shutil.which(name)
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $(date +%s.%N)" >> "{log}"\nexec "{real}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    log.write_text("")
    return bin_dir, log


class Sampler(threading.Thread):
    """PSS of the driver and its process tree; driver CPU seconds over time; load average."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period = period
        self.stop_event = threading.Event()
        self.pss_max = 0
        self.processes_max = 0
        self.cpu_timeline: list[tuple[float, float]] = []   # (time.time(), driver CPU s)
        self.children_cpu: dict[int, float] = {}
        self.load: list[float] = []

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop_event.is_set():
            try:
                children = me.children(recursive=True)
            except psutil.Error:
                children = []
            self.pss_max = max(self.pss_max, _pss(me.pid) + sum(_pss(c.pid) for c in children))
            self.processes_max = max(self.processes_max, len(children) + 1)
            for child in children:
                try:
                    t = child.cpu_times()
                    self.children_cpu[child.pid] = t.user + t.system
                except psutil.Error:
                    pass
            t = me.cpu_times()
            self.cpu_timeline.append((time.time(), t.user + t.system))
            self.load.append(os.getloadavg()[0])
            self.stop_event.wait(self.period)

    def driver_cpu_at(self, when: float) -> float:
        """Driver CPU seconds at ``when`` (linear between the two samples around it)."""
        before = [(t, c) for t, c in self.cpu_timeline if t <= when] or self.cpu_timeline[:1]
        after = [(t, c) for t, c in self.cpu_timeline if t >= when] or self.cpu_timeline[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def sweep_yaml(folder: Path, label: str, n: int, concurrency: int) -> Path:
    path = folder / f"{label}.yaml"
    path.write_text(json.dumps({
        "name": label,
        "base": {"data": {"dataset": "digits", "cache_dir": str(folder / "data")}, "train": {"epochs": 1},
                 "launch": {"timeout_min": 30, "mem_gb": 0.1}},
        "grid": {"seed": list(range(n))},
        "max_concurrent": concurrency,
        "max_trials": n,
    }))
    return path


def trial_records(out: Path) -> list[dict]:
    """Per trial: submitted, completed (ledger) and its last metrics line's time."""
    rows = []
    for path in sorted((out / "ledger").glob("t*.json")):
        record = json.loads(path.read_text())
        history = {event: t for event, t in reversed(record.get("history", []))}  # first time of each
        lines = (Path(record["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]).get("time") if lines else None
        job = json.loads((Path(record["run_dir"]) / "job.json").read_text())
        rows.append({"status": record["status"], "submitted": job.get("submitted"), "recorded": history.get(record["status"]),
                     "last_line": last})
    return rows


def call_times(log: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in COUNTED}
    for line in log.read_text().splitlines():
        name, _, t = line.partition(" ")
        if name in out:
            out[name].append(float(t))
    return out


def _rate(times: list[float], start: float, end: float) -> float | None:
    return round(sum(start <= t <= end for t in times) / (end - start), 3) if end - start > 5 else None


def run_one(folder: Path, log: Path, label: str, n: int, concurrency: int, steps: int, step_s: float) -> dict:
    out = folder / f"out-{label}"
    log.write_text("")
    sampler = Sampler()
    sampler.start()
    started = time.time()
    with open(folder / f"log-{label}.txt", "w") as console_log:
        run_sweep(sweep_yaml(folder, label, n, concurrency), partition="cpu", output_dir=out, dashboard=True,
                  target=TARGET, target_kwargs={"steps": steps, "step_s": step_s}, prepare=False, analyze=False,
                  console=Console(file=console_log, width=120), live=False)
    wall = time.time() - started
    sampler.stop_event.set()
    sampler.join()
    rows = trial_records(out)
    done = [r for r in rows if r["status"] == "completed"]
    if len(done) != n:
        raise SystemExit(f"{n - len(done)} of {n} trials did not complete: see {out}")
    calls = call_times(log)
    polls = sorted(calls["squeue"] + calls["sacct"])
    # steady state: every job of the run in flight (after the last submission, before the first end)
    steady = (max(r["submitted"] for r in rows), min(r["last_line"] for r in rows)) if n <= concurrency else (None, None)
    # per finished trial, from the first trial's end (Ray's start-up and the checks left out)
    ends = sorted(r["recorded"] for r in done)
    quarter = max(1, (n - 1) // 4)
    first_q = (sampler.driver_cpu_at(ends[quarter]) - sampler.driver_cpu_at(ends[0])) / quarter
    last_q = (sampler.driver_cpu_at(ends[-1]) - sampler.driver_cpu_at(ends[-1 - quarter])) / quarter
    driver_cpu = sampler.cpu_timeline[-1][1] - sampler.cpu_timeline[0][1]
    return {
        "trials": n, "max_concurrent": concurrency, "job": f"{steps} steps x {step_s} s",
        "wall_s": round(wall, 1),
        "slurm_calls": {
            **{name: len(times) for name, times in calls.items()},
            "squeue_sacct_per_s_steady": _rate(polls, *steady) if steady[0] else None,
            "steady_window_s": round(steady[1] - steady[0], 1) if steady[0] else None,
            "squeue_sacct_per_s_whole_run": round(len(polls) / wall, 3),
        },
        "memory": {"driver_and_ray_pss_max_mb": round(sampler.pss_max / 2**20, 1), "processes_max": sampler.processes_max},
        "driver_cpu_s_per_trial": {"whole_run": round(driver_cpu / n, 4),
                                   "from_first_end": round((sampler.driver_cpu_at(ends[-1]) - sampler.driver_cpu_at(ends[0])) / max(1, n - 1), 4),
                                   "first_quarter": round(first_q, 4), "last_quarter": round(last_q, 4)},
        "driver_and_ray_cpu_s_per_trial": round((driver_cpu + sum(sampler.children_cpu.values())) / n, 3),
        "line_to_recorded_s": summarise([r["recorded"] - r["last_line"] for r in done]),
        "load_average_1min": {"mean": round(statistics.fmean(sampler.load), 2), "max": round(max(sampler.load), 2)},
    }


def cluster(cpus: int, up: bool) -> None:
    """Bring the benchmark's own local cluster up (every job at once: ``cpus`` CPUs) or down."""
    env = {**os.environ, "LTSSL_CLUSTER_DIR": CLUSTER_DIR, "LTSSL_CLUSTER_CPUS": str(cpus)}
    script = str(REPO / "slurm" / "local-cluster")
    if not up:
        subprocess.run([script, "down"], env=env, capture_output=True)
        return
    result = subprocess.run([script, "up"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"slurm/local-cluster up failed:\n{result.stdout}\n{result.stderr}")
    for line in subprocess.run([script, "env"], env=env, capture_output=True, text=True, check=True).stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            os.environ[key] = shlex.split(value)[0] if value else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[32], help="trials in flight of the 60-s job runs")
    p.add_argument("--small", type=int, default=100, help="trials of the small no-op sweep")
    p.add_argument("--large", type=int, default=2000, help="trials of the large no-op sweep")
    p.add_argument("--noop-concurrency", type=int, default=32, help="max_concurrent of the no-op sweeps")
    p.add_argument("--note", default="", help="written into the JSON (e.g. why a run was scaled down)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cluster(max(args.concurrency + [args.noop_concurrency]) + 8, up=True)
    try:
        return measure(args)
    finally:
        cluster(0, up=False)


def measure(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    os.environ["RAY_TMPDIR"] = f"/tmp/ltr-scale-{os.getpid()}"
    bin_dir, log = slurm_wrappers(folder)
    os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"  # the driver, Ray's workers and the jobs inherit it
    runs = {}
    for c in args.concurrency:
        runs[f"jobs_60s_{c}_in_flight"] = run_one(folder, log, f"s60-{c}", c, c, steps=12, step_s=5.0)
    runs[f"noop_{args.small}_trials"] = run_one(folder, log, f"noop-{args.small}", args.small, args.noop_concurrency, 0, 0.0)
    runs[f"noop_{args.large}_trials"] = run_one(folder, log, f"noop-{args.large}", args.large, args.noop_concurrency, 0, 0.0)
    small = runs[f"noop_{args.small}_trials"]["driver_cpu_s_per_trial"]["from_first_end"]
    large = runs[f"noop_{args.large}_trials"]["driver_cpu_s_per_trial"]["from_first_end"]
    result = {
        "benchmark": "sweep_scale",
        "what": f"sweeps of {TARGET} jobs on the local one-node Slurm (partition cpu, every job can run at once), "
                "Slurm client calls counted through PATH wrappers",
        "goals": {"squeue_sacct_per_s_at_256_in_flight": 0.5, "pss_mb_at_64_in_flight": 2048, "pss_mb_at_256_in_flight": 4096,
                  "driver_cpu_per_trial_large_over_small": 1.2, "metrics_line_to_tune_poll_intervals": 2},
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "runs": runs,
        "driver_cpu_per_trial_large_over_small": round(large / small, 3) if small else None,
        "note": args.note,
        "command": "eval \"$(slurm/local-cluster env)\"; .venv/bin/python benchmarks/sweep_scale.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
