"""A sweep at scale on the real local Slurm: one batched squeue per interval for all trials in flight,
a failing squeue fails no trial, results.parquet is exact mid-sweep, the dashboard names the running trials.

Slurm's client commands are counted through PATH wrappers (``squeue``/``sacct`` scripts that log each
call, then run the real command, or exit 1 while a ``squeue.fail`` file exists). The trials' jobs run
:func:`hold`: they start, write one metrics line, and wait for a release file before running the
stand-in trainer, so "32 trials in flight" and "a job that finishes while squeue fails" are states the
tests wait for, not timings. The monitor's scheduling logic has fast unit tests at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_sweep_standin import REPO, TESTS, end_ray_orphans, ledger_records
from test_sweep_standin import train as standin_train
from waiting import wait_until

from ltssl.launch.monitor import MIN_INTERVAL_S, SlurmStateMonitor
from ltssl.launch.slurm_state import JobView, Observation, QueryError
from ltssl.results import read_table

HOLD_TARGET = "test_sweep_scale:hold"


def hold(cfg, run_dir, **kwargs) -> dict:
    """The jobs' target: one metrics line, then wait for ``$HOLD_DIR/go-all`` or ``go-<trial>``,
    then the stand-in trainer (3 short epochs, result.json, final line)."""
    hold_dir, run_dir = Path(os.environ["HOLD_DIR"]), Path(run_dir)
    with open(run_dir / "metrics.jsonl", "a") as out:
        out.write(json.dumps({"epoch": 0, "step": 0, "time": time.time(), "loss": 1.0}) + "\n")
    while not ((hold_dir / "go-all").exists() or (hold_dir / f"go-{run_dir.name}").exists()):
        time.sleep(0.2)
    return standin_train(cfg, run_dir, epoch_s=0.05)


# ------------------------------------------------------------------ helpers


def slurm_wrappers(folder: Path) -> tuple[Path, Path]:
    """PATH wrappers for squeue and sacct: each call appends ``name start_time exit_code`` to the log."""
    bin_dir, log = folder / "bin", folder / "slurm-calls.log"
    bin_dir.mkdir(parents=True)
    for name in ("squeue", "sacct"):
        real = shutil.which(name)
        assert real, f"{name} not found"
        fail = f'if [ -e "{folder}/{name}.fail" ]; then echo "{name} $t 1" >> "{log}"; echo "{name}: failing on purpose" >&2; exit 1; fi\n'
        script = (f"#!/bin/bash\nt=$(date +%s.%N)\n{fail}"
                  f'"{real}" "$@"\nrc=$?\necho "{name} $t $rc" >> "{log}"\nexit $rc\n')
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    log.touch()
    return bin_dir, log


def calls(log: Path, name: str) -> list[tuple[float, int]]:
    """(start time, exit code) of every logged call of ``name``, in time order."""
    out = []
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == name:
            out.append((float(fields[1]), int(fields[2])))
    return sorted(out)


def sweep_yaml(tmp_path: Path, trials: int) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "scale",
        "base": {"data": {"dataset": "digits", "cache_dir": str(tmp_path / "data")}, "train": {"epochs": 3, "eval_every": 1},
                 "launch": {"mem_gb": 0.25, "timeout_min": 30}},
        "grid": {"seed": list(range(trials))},
        "max_concurrent": trials,
        "max_trials": trials,
    }))
    return path


def start_sweep(tmp_path: Path, trials: int, bin_dir: Path, hold_dir: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["PYTHONPATH"] = f"{TESTS}:{env.get('PYTHONPATH', '')}"
    env["HOLD_DIR"] = str(hold_dir)
    env["RAY_TMPDIR"] = f"/tmp/lts-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**6}"
    hold_dir.mkdir(exist_ok=True)
    args = [sys.executable, str(REPO / "launch" / "sweep.py"), "--config", str(sweep_yaml(tmp_path, trials)),
            "--output-dir", str(tmp_path / "out"), "--partition", "cpu", "--no-analyze", "--target", HOLD_TARGET]
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)


def jobs_in_flight(out: Path) -> set[str]:
    """Job ids of the sweep's trials that are submitted and not over (from the ledger)."""
    return {r["job_id"] for r in ledger_records(out).values() if r["status"] == "running" and r.get("job_id")}


def real_squeue_states(job_ids: set[str]) -> dict[str, str]:
    """States of ``job_ids`` from squeue (the test's own PATH has no wrapper: these calls are not counted)."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(sorted(job_ids)), "--states=all", "-o", "%i|%T"],
                         capture_output=True, text=True).stdout
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def of_size(n: int, get):
    """A predicate for wait_until: ``get()`` when it holds exactly ``n`` items, else None."""
    def check():
        value = get()
        return value if len(value) == n else None
    return check


def dashboard_state(url: str, kind: str, state: str) -> list[dict]:
    """Ray's state API through the dashboard (``/api/v0/<kind>?detail=1``, what ``ray.util.state``'s
    ``list_<kind>(detail=True)`` asks) for the entries in ``state``, with the token the driver's Ray uses."""
    token = os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").read_text()
    query = f"detail=1&limit=10000&filter_keys=state&filter_predicates=%3D&filter_values={state}"
    request = urllib.request.Request(f"{url}/api/v0/{kind}?{query}", headers={"Authorization": f"Bearer {token.strip()}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())["data"]["result"]["result"]


def finish(driver: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        assert driver.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ on the real cluster


@pytest.mark.slurm
def test_32_trials_in_flight_one_squeue_per_interval_exact_results_mid_sweep_named_in_the_dashboard(slurm_cluster, tmp_path):
    import pandas as pd  # (deferred: the jobs import this module for hold() and need neither)

    bin_dir, calls_log = slurm_wrappers(tmp_path)
    hold_dir, log, out = tmp_path / "hold", tmp_path / "driver.log", tmp_path / "out"
    driver = start_sweep(tmp_path, 32, bin_dir, hold_dir, log)
    try:
        # 32 jobs submitted and known to Slurm at once (queued or running: the node runs some of them)
        in_flight = wait_until(of_size(32, lambda: jobs_in_flight(out)), 420, "32 jobs in flight")
        states = wait_until(of_size(32, lambda: real_squeue_states(in_flight)), 60, "squeue to list 32 jobs")
        assert set(states.values()) <= {"PENDING", "RUNNING"}, states
        first = wait_until(lambda: calls(calls_log, "squeue"), 120, "a monitor round")[-1][0]
        wait_until(lambda: len([t for t, _ in calls(calls_log, "squeue") if t > first]) >= 3, 180, "three more monitor rounds")

        # release 8 running trials: results.parquet mid-sweep has one row per finished trial
        # (the local cluster runs at least 8 jobs at once; Slurm starts queued jobs every few seconds)
        job_trial = {r["job_id"]: k for k, r in ledger_records(out).items()}
        def eight_running() -> list[str] | None:
            running_jobs = [j for j, state in real_squeue_states(in_flight).items() if state == "RUNNING"]
            return running_jobs if len(running_jobs) >= 8 else None

        running_jobs = wait_until(eight_running, 180, "8 running jobs")
        released = sorted(job_trial[j] for j in running_jobs)[:8]
        for key in released:
            (hold_dir / f"go-{key}").touch()
        wait_until(lambda: sorted(k for k, r in ledger_records(out).items() if r["status"] == "completed") == released,
                   300, "the 8 released trials to complete")
        rows = wait_until(lambda: read_table(out / "results.parquet").num_rows == 8, 60, "8 rows in results.parquet") and \
            read_table(out / "results.parquet")
        assert sorted(rows.column("trial_id").to_pylist()) == released
        assert set(rows.column("status").to_pylist()) == {"completed"}
        assert sorted(pd.read_parquet(out / "results.parquet")["trial_id"]) == released
        # the dashboard names the 24 trials still running (one placement group each, named by
        # the trial's id, group and parameters, holding its sweep slot); the 8 ended trials' are gone;
        # and the sweep starts no Ray worker process per trial (no live actor at all)
        url = re.search(r"dashboard (http://127\.0\.0\.1:\d+)", log.read_text())[1]
        running = {k for k, r in ledger_records(out).items() if r["status"] == "running"}
        assert len(running) == 24

        def named_by_running_trials() -> list[str] | None:
            names = [g["name"] for g in dashboard_state(url, "placement_groups", "CREATED")]
            return names if {n.split()[0] for n in names} == running else None

        named = wait_until(named_by_running_trials, 120, "one placement group per running trial, named by it")
        assert len(named) == 24 and all(re.fullmatch(r"t\d{4} \[digits/r=10/lt/simsiam\] seed=\d+", n) for n in named), named
        assert dashboard_state(url, "actors", "ALIVE") == []

        (hold_dir / "go-all").touch()
        finish(driver, log)
    finally:
        (hold_dir / "go-all").touch()  # a failed test leaves no job waiting
        if driver.poll() is None:
            driver.kill()
        end_ray_orphans(f"/tmp/lts-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**6}")

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 32 and set(df["status"]) == {"completed"} and df["linear_acc"].notna().all()
    squeue = [t for t, _ in calls(calls_log, "squeue")]
    assert len(squeue) >= 4
    gaps = [b - a for a, b in zip(squeue, squeue[1:])]
    # one caller for the whole sweep: consecutive squeue calls are at least one interval apart
    assert min(gaps) >= MIN_INTERVAL_S - 0.05, gaps


@pytest.mark.slurm
def test_squeue_failing_for_20_s_fails_no_trial_and_jobs_ending_meanwhile_are_recorded(slurm_cluster, tmp_path):
    import pandas as pd  # (deferred: the jobs import this module for hold() and need neither)

    bin_dir, calls_log = slurm_wrappers(tmp_path)
    hold_dir, log, out = tmp_path / "hold", tmp_path / "driver.log", tmp_path / "out"
    driver = start_sweep(tmp_path, 4, bin_dir, hold_dir, log)
    try:
        in_flight = wait_until(of_size(4, lambda: jobs_in_flight(out)), 300, "4 jobs in flight")
        wait_until(lambda: set(real_squeue_states(in_flight).values()) == {"RUNNING"}, 120, "4 running jobs")
        wait_until(lambda: calls(calls_log, "squeue"), 60, "a monitor round")
        (tmp_path / "squeue.fail").touch()

        def failed_calls() -> list[float]:
            return [t for t, rc in calls(calls_log, "squeue") if rc == 1]

        wait_until(lambda: len(failed_calls()) >= 2, 120, "two failed squeue calls")
        for key in ("t0000", "t0001"):  # these jobs end while squeue fails
            (hold_dir / f"go-{key}").touch()
        wait_until(lambda: {k for k, r in ledger_records(out).items() if r["status"] == "completed"} == {"t0000", "t0001"},
                   240, "the two released trials recorded completed while squeue fails")
        # the two others stay in flight through 20 s of failures (the monitor keeps trying, with backoff)
        wait_until(lambda: len(failed_calls()) >= 3 and time.time() >= failed_calls()[0] + 20, 120, "20 s of failing squeue")
        assert (tmp_path / "squeue.fail").exists() and not any(r["status"] == "failed" for r in ledger_records(out).values())
        (tmp_path / "squeue.fail").unlink()
        (hold_dir / "go-all").touch()
        finish(driver, log)
    finally:
        (hold_dir / "go-all").touch()  # a failed test leaves no job waiting
        if driver.poll() is None:
            driver.kill()
        end_ray_orphans(f"/tmp/lts-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**6}")

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 4 and set(df["status"]) == {"completed"} and df["error"].isna().all()
    assert df["linear_acc"].notna().all() and (df["epochs_run"] == 3).all()
    failed = [t for t, rc in calls(calls_log, "squeue") if rc == 1]
    gaps = [b - a for a, b in zip(failed, failed[1:])]
    assert gaps == sorted(gaps) and gaps[0] >= 2 * MIN_INTERVAL_S - 0.05, gaps  # retried with backoff


# ------------------------------------------------------------------ the monitor's scheduling (no Slurm)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_monitor_batches_adapts_its_interval_and_backs_off_on_failures():
    clock, asked = FakeClock(), []
    answers = {"squeue": {"1": JobView("RUNNING", "vm"), "2": JobView("PENDING")}}

    def fake_observe(ids):
        asked.append(list(ids))
        return Observation(answers["squeue"], None, clock.now)

    monitor = SlurmStateMonitor(min_interval_s=2.0, max_interval_s=30.0, backoff_max_s=16.0, observe_fn=fake_observe, clock=clock)
    monitor.watch(["2", "1"])
    assert monitor.poll_if_due() and asked == [["1", "2"]]  # one call for both jobs
    assert monitor.observation_for("1").squeue == {"1": JobView("RUNNING", "vm")}
    assert monitor.observation_for("3") is None and not monitor.poll_if_due()
    # steady state: the interval grows with the time since the last change, up to max_interval_s
    gaps = []
    for _ in range(12):
        clock.now += monitor.seconds_to_next_round()
        assert monitor.poll_if_due()
        gaps.append(monitor.seconds_to_next_round())
    assert gaps == sorted(gaps) and gaps[0] == 2.0 and gaps[-1] == 30.0
    # a new job brings the next round forward
    monitor.watch(["4"])
    assert monitor.seconds_to_next_round() == 2.0
    # failures: no change recorded, backoff doubles up to backoff_max_s, success resets it
    answers["squeue"] = QueryError("squeue failed: boom")
    waits = []
    for _ in range(5):
        clock.now += monitor.seconds_to_next_round()
        monitor.poll_if_due()
        waits.append(monitor.seconds_to_next_round())
    assert waits == [4.0, 8.0, 16.0, 16.0, 16.0] and monitor.failures == 5
    assert isinstance(monitor.observation_for("1").squeue, QueryError)
    answers["squeue"] = {"1": JobView("COMPLETED", "vm")}
    clock.now += monitor.seconds_to_next_round()
    monitor.poll_if_due()
    assert monitor.failures == 0 and monitor.seconds_to_next_round() == 2.0  # a state moved: short again
    assert monitor.calls == {"squeue": len(asked), "sacct": 0}
