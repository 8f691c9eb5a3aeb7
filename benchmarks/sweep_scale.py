#!/usr/bin/env python
"""A sweep at scale on the local Slurm: Slurm calls per second, memory, driver CPU per trial, latency.

Every trial is a Slurm job of the launch layer's toy trainer (``ltssl.launch.toy:train``): a no-op
job (0 steps) or a job of steps of 5 s, one metrics line per step (``--job-s``: 300 s by default;
issue 13 names 60-s jobs, but on this 2-core machine the driver took up to 230 s to submit 256 jobs,
so 60-s (or 180-s) jobs never all run at once and there is no steady state to measure; ``--job-s
60`` runs them). The benchmark brings up a
local cluster of its own (``LTSSL_CLUSTER_DIR=/tmp/ltssl-sweep-scale``) with ``LTSSL_CLUSTER_CPUS``
raised so that every job of a run can run at once (one CPU each), and gives each job a ``--mem``
small enough that Slurm's memory accounting lets all of them run at once too. Slurm's client
commands (squeue, sacct, sbatch, scancel) are counted through PATH wrappers that log each call.

Runs (defaults: the sizes of issue 13):

- jobs of ``--job-s`` at 32, 64, 128 and 256 in flight (``--concurrency``): trials = max_concurrent, so
  once every job has started the whole run is in flight and nothing changes until the first job
  ends: Slurm's steady state. A run is scaled down (and says so) when its jobs would not fit in
  this machine's free memory (one toy job is 33-49 MB PSS);
- no-op sweeps of 100 and 2,000 trials (``--small``, ``--large``), both at the same
  ``--noop-concurrency`` (32), so their driver CPU per trial compare.

Figures, per run:

- ``slurm_calls``: calls of each command; squeue+sacct per second over the steady state (every job
  of the run running: from the last job's start to the first job's last metrics line; also every
  trial in flight: from the last submission to the first recorded end) and over the whole run; the
  time between two squeue calls in the steady state;
- ``memory``: largest PSS of the driver (this process) plus every process it started, directly or
  not (Ray's GCS, raylet, dashboard and its modules, agents, log monitor, workers), sampled every
  0.5 s by a separate process (its own cost is in neither figure); the same broken down by process
  kind at the peak. The Slurm jobs are not counted: slurmd/slurmstepd start them (the sampler
  checks that none is in the driver's tree: ``slurm_job_processes_in_driver_tree``); their own PSS
  is given apart (``jobs_cluster_side_not_counted``);
- ``driver_cpu_s_per_trial``: CPU seconds of the driver process (all its threads) per trial: over
  the whole run; from the first trial's end to the last (start-up left out: this is what is
  compared between the small and the large sweep); from the first submission to the last end
  (every trial launched and ended once in it, start-up and the final rewrite outside: the goal
  compares this figure; a window bounded by ends leaves out the first ``max_concurrent`` launches,
  a third of a 100-trial sweep at 32 in flight and 1.6 % of a 2,000-trial one), and over ten
  equal slices of that window (flat cost: the slices agree); over the first and the last quarter
  of ends. ``children`` adds the driver's reaped child processes (the Slurm
  client calls); ``ray_cpu_s_per_trial`` the processes Ray started;
- ``line_to_tune_s``: for every metrics line, from its ``time`` (written by the job) to the driver
  handing it to Tune's scheduler (timed by wrapping the driver loop's ``Trial.report``), with the
  sweep's ``poll_interval_s`` (how often the driver looks at the jobs' files): the goal's figure;
  ``last_line_to_recorded_s``: from a job's last line (the toy trainer writes it right after
  result.json) to the trial's end recorded in the sweep ledger (adds the job's exit as Slurm sees
  it and the read of its result);
- the 1-minute load average (the machine is shared).

The JSON is rewritten after each run (``"complete": false`` until the last), with a ``goals``
section comparing the figures to issue 13's goals.

    .venv/bin/python benchmarks/sweep_scale.py                      # everything (39 min here)
    .venv/bin/python benchmarks/sweep_scale.py --concurrency 4 --small 10 --large 20 \\
        --noop-concurrency 4 --output /tmp/scale.json                # a small check, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "sweep_scale.json"
CLUSTER_DIR = "/tmp/ltssl-sweep-scale"
TARGET = "ltssl.launch.toy:train"
COUNTED = ("squeue", "sacct", "sbatch", "scancel")
STEP_S = 5.0
#: PSS of one running toy job (slurmstepd x2, the batch script, srun x2, the submitit Python), MB:
#: 49 MB measured alone on this machine, 33 MB each with 64 running (they share libraries' pages).
JOB_PSS_MB = 40
#: Memory kept for the driver and Ray when sizing a run, MB (issue 13's goal at 64 in flight; the
#: driver loop measured under 1 GB).
DRIVER_BUDGET_MB = 2048
GOALS = {"squeue_sacct_per_s_steady_at_256_in_flight": 0.5, "pss_mb_at_64_in_flight": 2048,
         "pss_mb_at_256_in_flight": 4096, "driver_cpu_per_trial_large_over_small": 1.2,
         "line_to_tune_poll_intervals": 2}


# ----------------------------------------------------------------------------- the sampler process
# Runs as `python sweep_scale.py --sample ...`: a separate process, so that reading /proc for
# hundreds of processes costs the driver nothing (it would otherwise count as driver CPU).

def _proc_table() -> dict[int, tuple[int, str, float, float]]:
    """pid -> (ppid, comm, own CPU s, reaped children's CPU s) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        head, _, rest = raw.rpartition(")")
        fields = rest.split()
        table[int(name)] = (int(fields[1]), head.partition("(")[2], (int(fields[11]) + int(fields[12])) / tick,
                            (int(fields[13]) + int(fields[14])) / tick)
    return table


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_kind(comm: str, cmd: str) -> str:
    """What a process of the driver's tree is, from its name and command line (read at each sample:
    Ray's processes rename themselves once started)."""
    if "submitit.core._submit" in cmd or comm == "slurmstepd":
        return "slurm_job"  # must never happen: jobs are slurmd's
    if comm in COUNTED or any(f"/bin/{c} " in cmd + " " for c in COUNTED):
        return "slurm_client_call"
    if comm == "gcs_server":
        return "ray_gcs"
    if comm == "raylet":
        return "ray_raylet"
    for marker, kind in (("ray::DashboardAgent", "ray_dashboard_agent"), ("dashboard/agent.py", "ray_dashboard_agent"),
                         ("ray::RuntimeEnvAgent", "ray_runtime_env_agent"), ("runtime_env/agent", "ray_runtime_env_agent"),
                         ("dashboard/dashboard.py", "ray_dashboard"), ("ray-dashboard-", "ray_dashboard_module"),
                         ("multiprocessing.forkserver", "ray_dashboard_module"),
                         ("multiprocessing.resource_tracker", "ray_dashboard_module"),
                         ("log_monitor.py", "ray_log_monitor"), ("autoscaler/_private/monitor.py", "ray_monitor"),
                         ("default_worker.py", "ray_worker:starting")):
        if marker in cmd:
            return kind
    if cmd.startswith("ray::"):
        return "ray_worker:" + re.split(r"[.\s]", cmd[5:], maxsplit=1)[0]
    return f"other:{comm}"


def sampler_main(driver: int, out: Path, stop: Path, period: float, job_period: float, job_markers: list[str]) -> None:
    me = os.getpid()
    peak = {"total_kb": 0, "by_kind_kb": {}, "count_by_kind": {}, "time": None}
    kind_max_kb: dict[str, int] = {}
    procs_max, jobs_in_tree_max = 0, 0
    ray_cpu: dict[int, float] = {}
    timeline = []   # (time, driver own CPU s, driver's reaped children CPU s)
    load = []
    jobs = {"pss_kb_max": 0, "processes_at_max": 0, "python_jobs_at_max": 0}
    next_jobs = 0.0
    while True:
        stopping = stop.exists()
        now = time.time()
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], list(children.get(driver, []))
        while todo:
            pid = todo.pop()
            if pid == me:
                continue
            tree.append(pid)
            todo.extend(children.get(pid, []))
        if driver in table:
            timeline.append((now, table[driver][2], table[driver][3]))
        by_kind: dict[str, int] = {}
        count: dict[str, int] = {}
        total = _pss_kb(driver)
        by_kind["driver"], count["driver"] = total, 1
        for pid in tree:
            kind = process_kind(table[pid][1], _cmdline(pid))
            pss = _pss_kb(pid)
            if kind == "slurm_job":
                jobs_in_tree_max = max(jobs_in_tree_max, 1 + count.get(kind, 0))
            else:
                total += pss
            by_kind[kind] = by_kind.get(kind, 0) + pss
            count[kind] = count.get(kind, 0) + 1
            if kind.startswith("ray"):
                ray_cpu[pid] = table[pid][2]
        for kind, kb in by_kind.items():
            kind_max_kb[kind] = max(kind_max_kb.get(kind, 0), kb)
        procs_max = max(procs_max, len(tree) + 1)
        if total > peak["total_kb"]:
            peak = {"total_kb": total, "by_kind_kb": by_kind, "count_by_kind": count, "time": now}
        load.append(os.getloadavg()[0])
        if now >= next_jobs or stopping:
            next_jobs = now + job_period
            jobs_pss, jobs_procs, pythons = 0, 0, 0
            for root, (_ppid, comm, *_r) in table.items():
                if comm != "slurmstepd":
                    continue
                sub, todo = [root], list(children.get(root, []))
                while todo:
                    pid = todo.pop()
                    sub.append(pid)
                    todo.extend(children.get(pid, []))
                cmds = [_cmdline(p) for p in sub]
                if not any(m in c for c in cmds for m in job_markers):
                    continue  # another cluster's job
                jobs_pss += sum(_pss_kb(p) for p in sub)
                jobs_procs += len(sub)
                pythons += sum("submitit.core._submit" in c and table.get(p, (0, ""))[1].startswith("python")
                               for p, c in zip(sub, cmds))
            if jobs_pss > jobs["pss_kb_max"]:
                jobs = {"pss_kb_max": jobs_pss, "processes_at_max": jobs_procs, "python_jobs_at_max": pythons}
        if stopping:
            break
        time.sleep(period)
    out.write_text(json.dumps({"peak": peak, "kind_max_kb": kind_max_kb, "processes_max": procs_max,
                               "slurm_job_processes_in_driver_tree": jobs_in_tree_max, "ray_cpu_s": sum(ray_cpu.values()),
                               "timeline": timeline, "load": load, "jobs": jobs}))


class Sampler:
    """The sampler process for the current run."""

    def __init__(self, folder: Path, label: str, period: float = 0.5, job_period: float = 5.0):
        self.out, self.stop = folder / f"sample-{label}.json", folder / f"sample-{label}.stop"
        self.stop.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--sample", str(os.getpid()), str(self.out), str(self.stop),
                                      str(period), str(job_period), str(folder), CLUSTER_DIR])

    def finish(self) -> dict:
        self.stop.write_text("")
        self.proc.wait(timeout=120)
        data = json.loads(self.out.read_text())
        self.timeline = data["timeline"]
        return data

    def driver_cpu_at(self, when: float, column: int = 1) -> float:
        """Driver CPU seconds at ``when`` (linear between the two samples around it)."""
        before = [row for row in self.timeline if row[0] <= when] or self.timeline[:1]
        after = [row for row in self.timeline if row[0] >= when] or self.timeline[-1:]
        (t0, c0), (t1, c1) = (before[-1][0], before[-1][column]), (after[0][0], after[0][column])
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


# ----------------------------------------------------------------------------- one run

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


def sweep_yaml(folder: Path, label: str, n: int, concurrency: int, mem_gb: float, poll_interval_s: float) -> Path:
    path = folder / f"{label}.yaml"
    path.write_text(json.dumps({
        "name": label,
        "base": {"data": {"dataset": "digits", "cache_dir": str(folder / "data")}, "train": {"epochs": 1},
                 "launch": {"timeout_min": 30, "mem_gb": mem_gb, "cpus_per_task": 1}},
        "grid": {"seed": list(range(n))},
        "max_concurrent": concurrency,
        "max_trials": n,
        "poll_interval_s": poll_interval_s,
    }))
    return path


def _first(history: list, event: str) -> float | None:
    return next((t for e, t in history if e == event), None)


def trial_records(out: Path) -> list[dict]:
    """Per trial: status, submitted and started (job.json), last metrics line's time, recorded (ledger)."""
    rows = []
    for path in sorted((out / "ledger").glob("t*.json")):
        record = json.loads(path.read_text())
        run_dir = Path(record["run_dir"]) if record.get("run_dir") else None
        row = {"trial": record.get("trial_id"), "status": record.get("status"), "error": record.get("error"),
               "recorded": _first(record.get("history") or [], record.get("status")) or record.get("updated"),
               "submitted": None, "started": None, "last_line": None}
        try:
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            row["last_line"] = json.loads(lines[-1]).get("time") if lines else None
        except (OSError, TypeError, ValueError):
            pass
        try:
            job = json.loads((run_dir / "job.json").read_text())
            row["submitted"], row["started"] = job.get("submitted"), job.get("started")
        except (OSError, TypeError, ValueError):
            pass
        rows.append(row)
    return rows


def call_times(log: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in COUNTED}
    for line in log.read_text().splitlines():
        name, _, t = line.partition(" ")
        if name in out:
            out[name].append(float(t))
    return out


def summarise(values: list[float]) -> dict | None:
    values = sorted(values)
    if not values:
        return None
    return {"n": len(values), "median": round(statistics.median(values), 3), "p90": round(values[int(0.9 * (len(values) - 1))], 3),
            "max": round(values[-1], 3), "mean": round(statistics.fmean(values), 3)}


def window_rates(calls: dict[str, list[float]], start: float | None, end: float | None) -> dict | None:
    """squeue, sacct and both per second in [start, end], and the gaps between squeue calls there."""
    if start is None or end is None or end - start < 5:
        return {"window_s": None if start is None or end is None else round(end - start, 1),
                "note": "no window of 5 s or more"}
    inside = {name: [t for t in calls[name] if start <= t <= end] for name in ("squeue", "sacct")}
    span = end - start
    squeue = sorted(inside["squeue"])
    return {"window_s": round(span, 1), "squeue_per_s": round(len(squeue) / span, 3),
            "sacct_per_s": round(len(inside["sacct"]) / span, 3),
            "squeue_sacct_per_s": round((len(squeue) + len(inside["sacct"])) / span, 3),
            "squeue_gap_s": summarise([b - a for a, b in zip(squeue, squeue[1:])])}


def drain(log: Path) -> None:
    """Cancel whatever a failed run left on the benchmark's cluster and wait until no job is left."""
    subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], capture_output=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if not out:
            return
        time.sleep(2)


class LineHook:
    """Times each metrics line as the driver hands it to Tune's scheduler: wraps the driver loop's
    ``Trial.report(line)`` (ltssl.sweep.trial) for the run, when that exists; the line's own
    ``time`` field says when the job wrote it. None when the driver has no such hook."""

    def __init__(self):
        self.seen: list[tuple[float, float, bool]] = []   # (line's time, when handed to Tune, last line of its job)
        self.installed = None
        try:
            from ltssl.sweep import trial as module  # noqa: PLC0415
        except ImportError:
            return
        cls = getattr(module, "Trial", None)
        original = getattr(cls, "report", None)
        if original is None:
            return
        seen = self.seen

        def report(trial, line, *args, **kwargs):
            written = line.get("time") if isinstance(line, dict) else None
            if isinstance(written, (int, float)):
                seen.append((written, time.time(), bool(line.get("final"))))
            return original(trial, line, *args, **kwargs)

        cls.report = report
        self.installed = (cls, original)

    def remove(self) -> None:
        if self.installed:
            cls, original = self.installed
            cls.report = original


def run_one(folder: Path, log: Path, label: str, n: int, concurrency: int, steps: int, mem_gb: float,
            poll_interval_s: float, timeout_s: float) -> dict:
    from rich.console import Console

    from ltssl.sweep import run_sweep

    out = folder / f"out-{label}"
    log.write_text("")
    sampler = Sampler(folder, label)
    time.sleep(1.0)   # the sampler's first look is before the driver starts anything
    timer = threading.Timer(timeout_s, lambda: os.kill(os.getpid(), signal.SIGINT))  # like Ctrl-C
    timer.daemon = True
    timer.start()
    started, error = time.time(), None
    hook = LineHook()
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {n} trials, {concurrency} at once, {steps} x {STEP_S:g} s jobs, "
          f"--mem {int(mem_gb * 1024)} MB (time limit {timeout_s / 60:.0f} min)", flush=True)
    try:
        with open(folder / f"log-{label}.txt", "w") as console_log:
            outcome = run_sweep(sweep_yaml(folder, label, n, concurrency, mem_gb, poll_interval_s), partition="cpu",
                                output_dir=out, dashboard=True, target=TARGET,
                                target_kwargs={"steps": steps, "step_s": STEP_S}, prepare=False, analyze=False,
                                console=Console(file=console_log, width=160), live=False)
        interrupted = getattr(outcome, "interrupted", None)
    except BaseException as exc:  # noqa: BLE001 - the run's failure is a finding, recorded
        error, interrupted = f"{type(exc).__name__}: {exc}", None
    finally:
        timer.cancel()
        hook.remove()
    wall = time.time() - started
    timed_out = wall >= timeout_s - 1
    sample = sampler.finish()
    rows = trial_records(out) if (out / "ledger").is_dir() else []
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    done = [r for r in rows if r["status"] == "completed" and r["recorded"] is not None]
    if error or timed_out or len(done) != n:
        drain(log)
    calls = call_times(log)
    shutil.copy(log, folder / f"slurm-calls-{label}.log")
    polls = calls["squeue"] + calls["sacct"]
    result: dict = {
        "trials": n, "max_concurrent": concurrency, "job": f"{steps} steps x {STEP_S:g} s", "job_mem_mb": int(mem_gb * 1024),
        "wall_s": round(wall, 1), "completed": len(done), "statuses": statuses,
        "machine_starved": starvation(sample),
    }
    if error or timed_out or interrupted or len(done) != n:
        result["problem"] = {"error": error, "timed_out_after_s": round(timeout_s) if timed_out else None,
                             "interrupted": interrupted,
                             "errors_of_trials": sorted({str(r["error"])[:300] for r in rows if r["error"]})[:5],
                             "console_log_tail": (folder / f"log-{label}.txt").read_text(errors="replace")[-2000:]}
    starts = [r["started"] for r in rows if r["started"]]
    submits = [r["submitted"] for r in rows if r["submitted"]]
    last_lines = [r["last_line"] for r in done if r["last_line"]]
    ends = sorted(r["recorded"] for r in done)
    # every trial of the run in flight at once (trials = max_concurrent); a trial whose submission
    # failed has no job and is left out of the windows
    all_in = n <= concurrency and bool(done)
    result["slurm_calls"] = {
        **{name: len(times) for name, times in calls.items()},
        "steady_every_job_running": window_rates(calls, max(starts), min(last_lines)) if all_in and starts else None,
        "steady_every_trial_in_flight": window_rates(calls, max(submits), min(ends)) if all_in and submits else None,
        "squeue_sacct_per_s_whole_run": round(len(polls) / wall, 3),
        "squeue_gap_s_whole_run": summarise([b - a for a, b in zip(sorted(calls["squeue"]), sorted(calls["squeue"])[1:])]),
    }
    peak = sample["peak"]
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    result["memory"] = {
        "driver_and_ray_pss_max_mb": mb(peak["total_kb"]),
        "at_peak_by_kind_mb": {k: mb(v) for k, v in sorted(peak["by_kind_kb"].items(), key=lambda kv: -kv[1])},
        "at_peak_processes_by_kind": peak["count_by_kind"],
        "max_by_kind_mb": {k: mb(v) for k, v in sorted(sample["kind_max_kb"].items(), key=lambda kv: -kv[1])},
        "processes_max": sample["processes_max"],
        "slurm_job_processes_in_driver_tree": sample["slurm_job_processes_in_driver_tree"],
        "jobs_cluster_side_not_counted": {"pss_max_mb": mb(sample["jobs"]["pss_kb_max"]),
                                          "processes": sample["jobs"]["processes_at_max"],
                                          "jobs_running": sample["jobs"]["python_jobs_at_max"],
                                          "pss_mb_per_job": mb(sample["jobs"]["pss_kb_max"] / sample["jobs"]["python_jobs_at_max"])
                                          if sample["jobs"]["python_jobs_at_max"] else None},
    }
    sampler.timeline = sample["timeline"]
    timeline = sample["timeline"]
    driver_cpu = timeline[-1][1] - timeline[0][1] if timeline else 0.0
    children_cpu = timeline[-1][2] - timeline[0][2] if timeline else 0.0
    if len(ends) >= 2:
        quarter = max(1, (len(ends) - 1) // 4)
        per = lambda a, b, k, col=1: round((sampler.driver_cpu_at(b, col) - sampler.driver_cpu_at(a, col)) / k, 4)  # noqa: E731
        result["driver_cpu_s_per_trial"] = {
            "whole_run": round(driver_cpu / n, 4),
            "from_first_end": per(ends[0], ends[-1], len(ends) - 1),
            "first_quarter": per(ends[0], ends[quarter], quarter),
            "last_quarter": per(ends[-1 - quarter], ends[-1], quarter),
            "children_whole_run": round(children_cpu / n, 4),
            "children_from_first_end": per(ends[0], ends[-1], len(ends) - 1, 2),
        }
        # From the first submission to the last end every trial of the sweep is launched once and
        # ends once; the driver's start-up (Ray, planning every trial) and its last full rewrite of
        # both files lie outside. This is what the goal compares: windows bounded by ends alone
        # mix the work differently at 100 and 2,000 trials (the last max_concurrent ends have no
        # launch after them: a third of a 100-trial sweep at 32 in flight, 1.6 % of a 2,000-trial one).
        if submits:
            first_submit = min(submits)
            cpu = result["driver_cpu_s_per_trial"]
            cpu["first_submission_to_last_end"] = per(first_submit, ends[-1], len(ends))
            cpu["startup_s"] = round(sampler.driver_cpu_at(first_submit) - timeline[0][1], 2)
            cpu["after_last_end_s"] = round(timeline[-1][1] - sampler.driver_cpu_at(ends[-1]), 2)
            # flat cost: the same figure over ten equal slices of that window, per unit of work
            # (a launch or an end each count half a trial)
            slices = []
            for k in range(10):
                a = first_submit + (ends[-1] - first_submit) * k / 10
                b = first_submit + (ends[-1] - first_submit) * (k + 1) / 10
                work = (sum(a < t <= b for t in submits) + sum(a < t <= b for t in ends)) / 2
                slices.append(round((sampler.driver_cpu_at(b) - sampler.driver_cpu_at(a)) / work, 4) if work else None)
            cpu["tenths_of_that_window"] = slices
    result["ray_cpu_s_per_trial"] = round(sample["ray_cpu_s"] / n, 4)
    result["poll_interval_s"] = poll_interval_s
    if hook.installed:
        (folder / f"lines-{label}.json").write_text(json.dumps(hook.seen))
        every_start = max(starts) if starts else None
        for name, pairs in (("line_to_tune_s", hook.seen),
                            ("line_to_tune_s_last_lines", [x for x in hook.seen if x[2]]),
                            ("line_to_tune_s_after_every_job_started",
                             [x for x in hook.seen if every_start and x[0] > every_start])):
            delays = [b - a for a, b, _last in pairs]
            result[name] = summarise(delays)
            if delays:
                result[name]["within_2_poll_intervals"] = round(sum(x <= 2 * poll_interval_s for x in delays) / len(delays), 3)
    else:
        result["line_to_tune_s"] = None
        result["line_to_tune_note"] = "the driver has no ltssl.sweep.trial.Trial.report to time lines at"
    latency = [r["recorded"] - r["last_line"] for r in done if r["last_line"]]
    result["last_line_to_recorded_s"] = summarise(latency)
    if latency:
        result["last_line_to_recorded_s"]["within_2_poll_intervals"] = round(sum(x <= 2 * poll_interval_s for x in latency) / len(latency), 3)
    spans = [(r["started"], r["last_line"]) for r in done if r["started"] and r["last_line"]]
    events = sorted([(a, 1) for a, _b in spans] + [(b, -1) for _a, b in spans])
    running = best = 0
    for _t, step in events:
        running += step
        best = max(best, running)
    result["jobs_running_at_once_max"] = best
    (folder / f"rows-{label}.json").write_text(json.dumps(rows))
    result["load_average_1min"] = {"mean": round(statistics.fmean(sample["load"]), 2), "max": round(max(sample["load"]), 2)}
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {wall:.0f} s, {len(done)}/{n} completed, "
          f"PSS {result['memory']['driver_and_ray_pss_max_mb']} MB, squeue {len(calls['squeue'])} sacct {len(calls['sacct'])}"
          + (f", problem: {error or ('timed out' if timed_out else interrupted)}" if "problem" in result else ""), flush=True)
    return result


# ----------------------------------------------------------------------------- cluster, sizes, goals

def cluster(cpus: int, up: bool) -> None:
    """Bring the benchmark's own local cluster up (fresh, ``cpus`` CPUs: every job at once) or down."""
    env = {**os.environ, "LTSSL_CLUSTER_DIR": CLUSTER_DIR, "LTSSL_CLUSTER_CPUS": str(cpus)}
    script = str(REPO / "slurm" / "local-cluster")
    # down first: `up` is a no-op on a cluster already up, whatever its CPU count
    subprocess.run([script, "down"], env=env, capture_output=True)
    if not up:
        return
    result = subprocess.run([script, "up"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"slurm/local-cluster up failed:\n{result.stdout}\n{result.stderr}")
    for line in subprocess.run([script, "env"], env=env, capture_output=True, text=True, check=True).stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            os.environ[key] = shlex.split(value)[0] if value else ""


def node_memory_mb() -> int:
    """RealMemory of the cluster's node (what Slurm lets the jobs' --mem add up to)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%m"], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0])


def available_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def fitting_concurrency(wanted: int, reserve_mb: int) -> int:
    """The largest number of toy jobs (<= wanted) that fit in this machine's free memory beside the
    driver and Ray (their goal) and ``reserve_mb`` left to the machine's other users."""
    return max(1, min(wanted, (available_mb() - reserve_mb - DRIVER_BUDGET_MB) // JOB_PSS_MB))


def job_mem_gb(concurrency: int, node_mb: int) -> float:
    """--mem of each job: 100 MB, or less so that ``concurrency`` of them fit in the node (Slurm
    counts --mem against RealMemory); the toy job peaks near 50 MB PSS (Slurm's UsePss limit)."""
    mb = min(100, int(node_mb * 0.98 // max(1, concurrency)))
    if mb < 64:
        raise SystemExit(f"{concurrency} jobs at once need --mem {mb} MB each: under the toy job's ~50 MB; fewer in flight")
    return mb / 1024


def starvation(sample: dict) -> dict:
    """How starved the whole machine was: the sampler (its own process, every 0.5 s) missing its
    turn for seconds (``load_average_1min`` beside it). Lines waiting while the sampler waited too
    were waiting for a CPU, not for the driver's loop."""
    times = [row[0] for row in sample["timeline"]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"sampler_longest_gap_s": round(max(gaps), 1) if gaps else None,
            "sampler_gaps_over_5_s": sum(g > 5 for g in gaps)}


def goal(value, limit, measured_at: str, note: str = "") -> dict:
    entry = {"value": value, "goal": limit, "measured_at": measured_at,
             "met": None if value is None else bool(value <= limit)}
    if note:
        entry["note"] = note
    return entry


def goals(runs: dict, args: argparse.Namespace) -> dict:
    out = {}
    s60 = {r["max_concurrent"]: r for key, r in runs.items() if key.startswith("jobs_")}
    for wanted, name, key, limit in ((256, "squeue_sacct_per_s_steady_at_256_in_flight", None, 0.5),
                                     (64, "pss_mb_at_64_in_flight", None, 2048), (256, "pss_mb_at_256_in_flight", None, 4096)):
        if not s60:
            continue
        at = wanted if wanted in s60 else max(s60)
        run = s60[at]
        note = "" if at == wanted else f"not run at {wanted} in flight: the largest run was {at} (see its note)"
        if name.startswith("squeue"):
            steady = run["slurm_calls"].get("steady_every_job_running") or {}
            value = steady.get("squeue_sacct_per_s")
            where = f"{at} in flight, {run['job']} jobs, steady window {steady.get('window_s')} s"
            if value is None:
                value = run["slurm_calls"]["squeue_sacct_per_s_whole_run"]
                where = f"{at} in flight, {run['job']} jobs, the whole run ({run['wall_s']} s)"
                note = (note + "; " if note else "") + (
                    f"no steady state: the jobs never all ran at once (at most {run.get('jobs_running_at_once_max')} of "
                    f"{run['trials']}), so the rate over the whole run, starts and ends included, stands for it: an upper "
                    "bound (the monitor asks more often while jobs start and end)")
            out[name] = goal(value, limit, where, note)
        else:
            out[name] = goal(run["memory"]["driver_and_ray_pss_max_mb"], limit, f"{at} in flight, {run['job']} jobs", note)
    small, large = runs.get(f"noop_{args.small}_trials"), runs.get(f"noop_{args.large}_trials")
    key = "first_submission_to_last_end"
    if small and large and key in small.get("driver_cpu_s_per_trial", {}) and key in large.get("driver_cpu_s_per_trial", {}):
        a, b = small["driver_cpu_s_per_trial"][key], large["driver_cpu_s_per_trial"][key]
        fa, fb = small["driver_cpu_s_per_trial"]["from_first_end"], large["driver_cpu_s_per_trial"]["from_first_end"]
        out["driver_cpu_per_trial_large_over_small"] = goal(
            round(b / a, 3) if a else None, 1.2, f"no-op, {args.small} vs {args.large} trials, {args.noop_concurrency} at once",
            f"driver CPU s per trial from the first submission to the last end (each trial launched and ended once "
            f"in it): {a} vs {b}. From the first end to the last: {fa} vs {fb} "
            f"({round(fb / fa, 3) if fa else None}x; that window leaves out the first max_concurrent launches, a "
            f"third of the small sweep's)")
    out["line_to_tune_p90_poll_intervals_per_run"] = {
        key: {"all_lines": round(run["line_to_tune_s"]["p90"] / run["poll_interval_s"], 2),
              "after_every_job_started": round(run["line_to_tune_s_after_every_job_started"]["p90"] / run["poll_interval_s"], 2)
              if run.get("line_to_tune_s_after_every_job_started") else None}
        for key, run in runs.items() if run.get("line_to_tune_s")}
    for figure, name, what in (("line_to_tune_s", "line_to_tune_poll_intervals",
                                 "every metrics line, from its time to the driver handing it to Tune's scheduler"),
                                ("line_to_tune_s_last_lines", "last_line_to_tune_poll_intervals",
                                 "each job's last metrics line, from its time to the driver handing it to Tune's scheduler"),
                                ("last_line_to_recorded_s", "last_line_to_recorded_poll_intervals",
                                 "a job's last metrics line to the trial's end recorded in the ledger (not the goal's "
                                 "figure: it adds the job's exit, Slurm's view of it and the result's read)")):
        worst = None
        for key, run in runs.items():
            lat, poll = run.get(figure), run.get("poll_interval_s")
            if lat and poll:
                ratio = round(lat["p90"] / poll, 2)
                if worst is None or ratio > worst[0]:
                    worst = (ratio, key, lat, poll)
        if worst:
            ratio, key, lat, poll = worst
            starved = runs[key].get("machine_starved") or {}
            load = runs[key].get("load_average_1min") or {}
            entry = goal(ratio, 2, f"p90 of the worst run ({key}), in poll intervals of {poll} s",
                         f"{what}: median {lat['median']} s, p90 {lat['p90']} s, max {lat['max']} s; in that run the "
                         f"sampler process missed its 0.5-s turn for up to {starved.get('sampler_longest_gap_s')} s and "
                         f"the 1-minute load reached {load.get('max')}")
            if name.startswith("last_line_to_recorded"):
                entry = {"value": ratio, "goal": None, "measured_at": entry["measured_at"], "note": entry["note"]}
            out[name] = entry
    return out


def code_version() -> dict:
    """The commit whose code ran: this checkout's HEAD and whether ltssl/ differs from it, or, for a
    copy without .git (``git archive <commit>``, run with PYTHONPATH set to it), $LTSSL_BENCH_COMMIT."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        return {"commit": os.environ.get("LTSSL_BENCH_COMMIT"), "source": f"copy of the commit at {REPO}"}
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ltssl", "slurm"], cwd=REPO, capture_output=True, text=True)
    return {"commit": head.stdout.strip(), "ltssl_or_slurm_modified": bool(dirty.stdout.strip())}


def _without_output(argv: list[str]) -> list[str]:
    """The command line as recorded: without --output (where this copy of the JSON went)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--output":
            skip = True
        elif not a.startswith("--output="):
            out.append(a)
    return out


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--sample"]:
        driver, out, stop, period, job_period, *markers = argv[1:]
        sampler_main(int(driver), Path(out), Path(stop), float(period), float(job_period), markers)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--concurrency", type=int, nargs="*", default=[32, 64, 128, 256],
                   help="trials in flight of the --job-s runs, one run each (none: skip them)")
    p.add_argument("--job-s", type=float, default=300.0,
                   help=f"length of those jobs, seconds (steps of {STEP_S:g} s); 300 by default: on 2 cores the driver "
                        "took up to 230 s to submit 256 jobs, so shorter jobs never all run at once (no steady state)")
    p.add_argument("--small", type=int, default=100, help="trials of the small no-op sweep (0: skip)")
    p.add_argument("--large", type=int, default=2000, help="trials of the large no-op sweep (0: skip)")
    p.add_argument("--noop-concurrency", type=int, default=32, help="max_concurrent of both no-op sweeps")
    p.add_argument("--poll-interval", type=float, default=0.5, help="the sweeps' poll_interval_s (the spec's default)")
    p.add_argument("--reserve-gb", type=float, default=4.0, help="memory left to the machine's other users")
    p.add_argument("--timeout-min", type=float, default=0, help="time limit of one run (0: from its size)")
    p.add_argument("--note", default="", help="written into the JSON")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sizes = list(args.concurrency) + ([args.noop_concurrency] if args.small or args.large else [])
    cluster(max(sizes + [1]) + 8, up=True)
    try:
        return measure(args, argv)
    finally:
        cluster(0, up=False)


def measure(args: argparse.Namespace, argv: list[str]) -> int:
    folder = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    os.environ["RAY_TMPDIR"] = f"/tmp/ltr-scale-{os.getpid()}"
    bin_dir, log = slurm_wrappers(folder)
    os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"  # the driver, Ray's workers and the jobs inherit it
    node_mb = node_memory_mb()
    steps = max(1, round(args.job_s / STEP_S))
    plan = [(f"jobs_{steps * STEP_S:g}s_{c}_in_flight", c, c, steps) for c in args.concurrency]
    plan += [(f"noop_{n}_trials", n, args.noop_concurrency, 0) for n in (args.small, args.large) if n]
    estimate_s = sum(90 + steps * STEP_S + c * 0.5 if steps else 60 + n * 0.6 for _k, n, c, steps in plan)
    print(f"sweep_scale: {len(plan)} runs, estimated {estimate_s / 60:.0f} min; working folder {folder}", flush=True)
    began = time.time()
    result = {
        "benchmark": "sweep_scale",
        "what": f"sweeps of {TARGET} jobs on the local one-node Slurm (partition cpu, {max([c for _k, _n, c, _s in plan] + [1]) + 8} "
                "CPUs declared: every job of a run can run at once), Slurm client calls counted through PATH wrappers",
        "memory_counted": "PSS of the driver process plus every process in its tree (Ray: GCS, raylet, dashboard and its "
                          "modules, dashboard and runtime-env agents, log monitor, workers; short Slurm client calls), "
                          "sampled every 0.5 s by a separate process; Slurm jobs are started by slurmd and are not counted "
                          "(slurm_job_processes_in_driver_tree checks it; their PSS is given apart as jobs_cluster_side_not_counted)",
        "goals_of_issue_13": GOALS,
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "slurm_node_memory_mb": node_mb, "python": platform.python_version()},
        "runs": {}, "complete": False, "note": args.note,
        "command": ".venv/bin/python benchmarks/sweep_scale.py" + "".join(f" {shlex.quote(a)}" for a in _without_output(argv)),
        "code": code_version(),
        "estimated_min": round(estimate_s / 60, 1),
    }
    for key, n, concurrency, steps in plan:
        notes = []
        if steps:  # every job at once: scaled down when they would not fit in the free memory
            fits = fitting_concurrency(concurrency, int(args.reserve_gb * 1024))
            if fits < concurrency:
                notes.append(f"{concurrency} jobs at once would not fit in this machine's free memory "
                             f"({available_mb()} MB available, {JOB_PSS_MB} MB per job, {DRIVER_BUDGET_MB} MB for the driver "
                             f"and Ray, {args.reserve_gb:g} GB left to others): ran {fits}")
                n = concurrency = fits
        limit = args.timeout_min * 60 or (600 + 4 * steps * STEP_S + 3 * n if steps else 600 + 3 * n)
        label = key.replace("_", "-")
        run = run_one(folder, log, label, n, concurrency, steps, job_mem_gb(concurrency, node_mb), args.poll_interval, limit)
        if notes:
            run["note"] = "; ".join(notes)
        result["runs"][key] = run
        result["goals"] = goals(result["runs"], args)
        result["wall_min"] = round((time.time() - began) / 60, 1)
        result["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write(result, args.output)
    result["complete"] = True
    write(result, args.output)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
