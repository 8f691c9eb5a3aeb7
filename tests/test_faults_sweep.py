"""Faults of the sweep driver on the real local Slurm cluster (issue 14, faults 6 and 7).

6. A second driver on a sweep folder that a driver holds, and ``--resume`` of a folder that is not
   a sweep: refused in one line (exit 2), nothing in the folder touched.
7. Ray's GCS server or raylet killed under a running sweep: the driver exits with one line (exit
   75), the Slurm jobs keep running, and ``--resume`` re-attaches to them and finishes with every
   trial exactly once.

Trials run the stand-in trainer of test_sweep_standin.py as Slurm jobs (partition cpu), driven by
``launch/sweep.py`` in a child process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_sweep_standin import (
    REPO,
    TARGET,
    TESTS,
    checkpoint_epoch,
    end_ray_orphans,
    ledger_records,
    ray_orphans,
    start_driver,
    sweep_env,
)
from waiting import wait_until

from ltssl.launch.slurm_state import JobStatus, Observation, QueryError, lost_job, resolve
from ltssl.sweep.bookkeeping import Bookkeeper
from ltssl.sweep.raywatch import RAY_LOST_EXIT
from ltssl.sweep.resume import settle_unfinished
from ltssl.sweep.spec import load_sweep

pytestmark = pytest.mark.slurm


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def sweep_file(tmp_path: Path, epochs: int) -> Path:
    base = {"data": {"dataset": "digits", "cache_dir": str(tmp_path / "data")}, "train": {"epochs": epochs, "eval_every": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "base": base, "grid": {"rho": [1.0, 0.5, 0.3]}, "max_concurrent": 2},
                                   sort_keys=False))
    return path


def snapshot(folder: Path, skip_trials: bool = False) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: (size, mtime in ns, content); the trials' folders left out when
    their jobs are still writing there."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not (skip_trials and rel.parts[0] == "trials" and len(rel.parts) > 2):
            stat = path.stat()
            out[str(rel)] = (stat.st_size, stat.st_mtime_ns, path.read_bytes())
    return out


def sweep_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), *args, "--target", TARGET],
                          capture_output=True, text=True, env=env, timeout=300)


def mid_sweep(out: Path):
    """{trial key: job id} of the trials in mid-training (a checkpoint, several epochs to go), once there is one."""
    records = ledger_records(out)
    running = {k: r["job_id"] for k, r in records.items() if r["status"] == "running"
               and 1 <= checkpoint_epoch(Path(r["run_dir"])) <= 2}
    return running or None


def resume_and_check_every_trial_once(out: Path, env: dict, log: Path, running: dict[str, str], hold: Path) -> None:
    """--resume finishes the sweep: each running trial kept its job (re-attached), one job per trial.

    The jobs wait for ``hold`` before they finish: it is created once the resumed driver has
    counted them as jobs to re-attach."""
    resumed = start_driver(["--resume", "--output-dir", str(out), "--no-analyze", "--no-dashboard"], env, log)
    try:
        wait_until(lambda: "job(s) to re-attach" in log.read_text() or resumed.poll() is not None, 240,
                   "the resumed driver to settle the sweep")
    finally:
        hold.write_text("go")
    assert f"0 failed; {len(running)} job(s) to re-attach" in log.read_text(), log.read_text()
    assert resumed.wait(timeout=300) == 0, log.read_text()
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["trial_id"]) == ["t0000", "t0001", "t0002"] and set(df["status"]) == {"completed"}
    after = ledger_records(out)
    for key, job_id in running.items():
        assert after[key]["job_ids"] == [job_id], (key, after[key]["job_ids"])  # the same job: not resubmitted
        assert len((out / "trials" / key / "starts.log").read_text().splitlines()) == 1  # trained once
    every_job = [j for r in after.values() for j in r["job_ids"]]
    assert len(every_job) == len(set(every_job)) == 3


@pytest.fixture(autouse=True)
def standin_importable(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.chdir(tmp_path)


def test_a_second_driver_on_a_held_sweep_folder_is_refused_and_touches_nothing(slurm_cluster, tmp_path):
    sweep = sweep_file(tmp_path, epochs=4)
    out = tmp_path / "out"
    env = sweep_env(tmp_path, epoch_s=1.0)
    first = start_driver(["--config", str(sweep), "--output-dir", str(out), "--partition", "cpu", "--no-analyze",
                          "--no-dashboard"], env, tmp_path / "first.log")
    try:
        wait_until(lambda: mid_sweep(out), 240, "a trial in mid-training")
        first.send_signal(signal.SIGSTOP)  # the first driver holds its lock and changes nothing meanwhile
        before = snapshot(out, skip_trials=True)
        trials_before = sorted(p.name for p in (out / "trials").iterdir())
        env_second = dict(env, RAY_TMPDIR=env["RAY_TMPDIR"] + "-2")
        again = sweep_cli("--resume", "--output-dir", str(out), env=env_second)
        assert again.returncode == 2, again.stderr
        assert again.stderr.strip().splitlines() == [f"sweep: another driver (pid {first.pid}) is running the sweep in {out}"]
        anew = sweep_cli("--config", str(sweep), "--output-dir", str(out), "--partition", "cpu", env=env_second)
        assert anew.returncode == 2, anew.stderr
        assert anew.stderr.strip().splitlines() == [f"sweep: --output-dir {out} already holds a sweep: add --resume to continue it"]
        assert snapshot(out, skip_trials=True) == before
        assert sorted(p.name for p in (out / "trials").iterdir()) == trials_before
        assert not ray_orphans(env_second["RAY_TMPDIR"])  # refused before any Ray started
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["trial_id"]) == ["t0000", "t0001", "t0002"] and set(df["status"]) == {"completed"}
    every_job = [j for r in ledger_records(out).values() for j in r["job_ids"]]
    assert len(every_job) == len(set(every_job)) == 3


@pytest.mark.parametrize("case", ["no sweep.json", "corrupt sweep.json", "no sweep.yaml"])
def test_resume_of_a_folder_that_is_not_a_sweep_is_refused_and_touches_nothing(tmp_path, case):
    folder = tmp_path / "not-a-sweep"
    (folder / "trials" / "t0000").mkdir(parents=True)
    (folder / "trials" / "t0000" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (folder / "notes.txt").write_text("my own files\n")
    if case == "corrupt sweep.json":
        (folder / "sweep.json").write_text('{"sweep_id": "x", "na')
        (folder / "sweep.yaml").write_text("name: x\n")
    elif case == "no sweep.yaml":
        (folder / "sweep.json").write_text(json.dumps({"sweep_id": "x", "name": "x"}))
    before = snapshot(folder)
    env = sweep_env(tmp_path, epoch_s=0.1)
    refused = sweep_cli("--resume", "--output-dir", str(folder), env=env)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sweep: --resume: {folder} "), lines
    expected = {"no sweep.json": "holds no sweep (no sweep.json)",
                "corrupt sweep.json": "is not a readable sweep folder: ",
                "no sweep.yaml": "is not a readable sweep folder: "}[case]
    assert expected in lines[0] and "Traceback" not in refused.stderr
    assert snapshot(folder) == before  # nothing written, not even a lock file
    assert not ray_orphans(env["RAY_TMPDIR"])


@pytest.mark.parametrize("process", ["gcs_server", "raylet"])
def test_ray_killed_under_a_running_sweep_the_jobs_run_on_and_resume_reattaches(slurm_cluster, tmp_path, process):
    sweep = sweep_file(tmp_path, epochs=4)
    out = tmp_path / "out"
    hold = tmp_path / "jobs-may-finish"
    env = dict(sweep_env(tmp_path, epoch_s=1.0), STANDIN_HOLD=str(hold))
    log1 = tmp_path / "run1.log"
    driver = start_driver(["--config", str(sweep), "--output-dir", str(out), "--partition", "cpu", "--no-analyze",
                           "--no-dashboard"], env, log1)
    try:
        training = wait_until(lambda: mid_sweep(out), 240, "a trial in mid-training")
        # the driver's own Ray process, found by its temp folder (this test's alone) and its name
        ray_pids = [pid for pid in ray_orphans(env["RAY_TMPDIR"])
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(process.encode())]
        assert len(ray_pids) == 1, ray_pids
        os.kill(ray_pids[0], signal.SIGKILL)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    text = log1.read_text()
    assert code == RAY_LOST_EXIT, text
    name = {"gcs_server": "Ray's GCS server", "raylet": "Ray's raylet"}[process]
    said = [line for line in text.splitlines() if line.startswith("sweep: ")]
    assert said == [f"sweep: {name} (pid {ray_pids[0]}) died (killed by signal 9): the driver stops, the jobs keep "
                    f"running; continue with --resume --output-dir {out} (it re-attaches to them)"], text
    assert "Traceback" not in text and "Raylet is terminated" not in text, text  # no Ray dump around the line
    records = ledger_records(out)
    assert {r["status"] for r in records.values()} <= {"pending", "running"}, records  # nothing failed or cancelled
    running = {k: r["job_id"] for k, r in records.items() if r["status"] == "running"}
    assert set(training) <= set(running)
    assert set(running.values()) <= squeue_ids()  # the jobs run on (held until the resumed driver counted them)
    end_ray_orphans(env["RAY_TMPDIR"])

    resume_and_check_every_trial_once(out, env, tmp_path / "run2.log", running, hold)
    assert not ray_orphans(env["RAY_TMPDIR"])


def test_a_trial_lost_to_an_unreachable_slurmctld_is_picked_up_by_resume(tmp_path):
    """Fault 1 past launch.controller_downtime_s: the trial ends failed with the handle's one line,
    its job is not cancelled (it may run on unseen), and --resume looks at the job again and runs
    the trial (re-attach, or resubmit on its run_dir); a trial whose job itself failed stays failed."""
    down = QueryError("squeue failed: slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    gave_up = resolve("7", Observation(down, {}, 700.0), unreachable_s=700.0, tolerated_s=600, last=JobStatus("RUNNING", "n1"))
    assert gave_up.error is not None and lost_job(gave_up.error)
    assert not lost_job("job 7 ended FAILED: Traceback ... ZeroDivisionError") and not lost_job(None)

    book = Bookkeeper(load_sweep(TESTS.parent / "sweeps" / "digits_lt" / "default.yaml"), tmp_path, "sweep-x")
    for key in ("t0000", "t0001"):
        run_dir = tmp_path / "trials" / key
        run_dir.mkdir(parents=True)
        book.ledger.create({"trial_id": key, "status": "running", "group": "r=10", "params": {}, "run_dir": str(run_dir),
                            "job_id": "7", "job_ids": ["7"]})
    book.ledger.update("t0000", error=gave_up.error)  # as the trial's result() records it
    book.finish("t0000", "failed", error=gave_up.error, cancel=True)
    book.finish("t0001", "failed", error="job 8 ended FAILED: ZeroDivisionError", cancel=True)
    assert len(book.cancels) == 1  # only the trial whose job really failed is cancelled (a backstop)
    assert book.ledger.read("t0000")["status"] == "failed"  # what this driver's user sees: one line, the cause

    counts = settle_unfinished(book, None)  # what --resume does first
    lost = book.ledger.read("t0000")
    assert lost["status"] == "running" and lost["error"] is None  # the resumed driver runs it (no job.json: resubmit)
    assert counts == {"finished_while_away": 0, "failed_while_away": 0, "reattach": 0, "resubmit": 1}
    assert book.ledger.read("t0001")["status"] == "failed"
    book.wait_cancels()
