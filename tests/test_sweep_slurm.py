"""Sweeps on the local Slurm cluster: ASHA cancels jobs, failures, resume re-attaches, dashboard auth.

Trials run the stand-in trainer of test_sweep_standin.py as real Slurm jobs (ltssl.launch.submit,
partition cpu); the last test runs the real trainer (ltssl.train) on digits for one epoch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ltssl.sweep import run_sweep
from ltssl.sweep.dashboard import read_token
from test_sweep_standin import (
    FAIL_RHO,
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

pytestmark = pytest.mark.slurm


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    return out.strip().split("\n")[0].split(" ")[0] if out.strip() else ""


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def sweep_file(tmp_path: Path, **tree) -> Path:
    base = {"data": {"dataset": "digits", "cache_dir": str(tmp_path / "data")}, "train": {"epochs": 3, "eval_every": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": base, **tree}, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def standin_importable(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.chdir(tmp_path)


def test_asha_cancels_the_jobs_of_stopped_trials_and_a_failed_job_fails_only_its_trial(slurm_cluster, tmp_path):
    sweep = sweep_file(tmp_path, grid={"rho": [1.0, 0.05, FAIL_RHO], "imbalance_ratio": [1, 100]},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}, max_concurrent=2)
    out = tmp_path / "out"
    run_sweep(sweep, partition="cpu", output_dir=out, target=TARGET, dashboard=False,
              target_kwargs={"epoch_s": 1.6, "steps_per_epoch": 4}, prepare=False, analyze=False)
    df = pd.read_parquet(out / "results.parquet").set_index("trial_id")
    status = {(r.imbalance_ratio, r.rho): r.status for r in df.itertuples()}
    assert status == {(1.0, 1.0): "completed", (100.0, 1.0): "completed",
                      (1.0, 0.05): "stopped_early", (100.0, 0.05): "stopped_early",
                      (1.0, FAIL_RHO): "failed", (100.0, FAIL_RHO): "failed"}
    assert set(df["partition"]) == {"cpu"} and df["node_list"].notna().all()
    stopped = df[df["status"] == "stopped_early"]["slurm_job_id"].tolist()
    # the stopped trials' jobs were cancelled: gone from squeue (Slurm's KillWait is 15 s here, slurm/slurm.conf.in)
    wait_until(lambda: not (set(stopped) & squeue_ids()), 120, f"jobs {stopped} to leave squeue")
    # slurmdbd records a job's end after squeue drops it
    wait_until(lambda: all(sacct_state(j) == "CANCELLED" for j in stopped), 60, f"accounting to record {stopped} CANCELLED")
    for job_id in stopped:
        assert sacct_state(job_id) == "CANCELLED", job_id
    for trial, row in df[df["status"] == "stopped_early"].iterrows():
        assert not (Path(row["run_dir"]) / "result.json").exists() and row["epochs_run"] == 1
    failed = df[df["status"] == "failed"]
    ended = ("FAILED", "COMPLETED")
    wait_until(lambda: all(sacct_state(j) in ended for j in failed["slurm_job_id"]), 60,
               "accounting to record the failed trials' jobs as ended")
    for _, row in failed.iterrows():
        assert "stand-in failure at epoch 1" in row["error"] and "Traceback" in row["error"]
        assert sacct_state(row["slurm_job_id"]) in ended  # the job raised; Slurm's view
    completed = df[df["status"] == "completed"]
    assert (completed["epochs_run"] == 3).all() and completed["linear_acc"].notna().all()
    # a trial ends when its job's result is written; the job leaves squeue once its process exits
    wait_until(lambda: not (set(df["slurm_job_id"]) & squeue_ids()), 60, "every job to leave squeue")
    assert not (set(df["slurm_job_id"]) & squeue_ids())


def test_resume_reattaches_to_running_jobs_and_the_dashboard_needs_its_token(slurm_cluster, tmp_path):
    """Kill the driver (SIGKILL) mid-sweep; --resume re-attaches: no job duplicated, none orphaned."""
    sweep = sweep_file(tmp_path, grid={"rho": [1.0, 0.5, 0.3]}, max_concurrent=2)
    sweep.write_text(sweep.read_text().replace("epochs: 3", "epochs: 6"))
    out = tmp_path / "out"
    env = sweep_env(tmp_path, epoch_s=1.5)
    log1 = tmp_path / "run1.log"
    driver = start_driver(["--config", str(sweep), "--output-dir", str(out), "--partition", "cpu", "--no-analyze"],
                          env, log1)
    try:
        # --partition turns the dashboard on: bound to 127.0.0.1, token authentication on. The URL
        # line comes first and its two hint lines right after: wait for all three.
        def dashboard_lines():
            text = log1.read_text()
            found = re.search(r"dashboard (http://127\.0\.0\.1:(\d+))", text)
            return found if found and "paste the token from" in text and "ssh -N -L" in text else None

        found = wait_until(dashboard_lines, 120, "the dashboard URL and its ssh and token lines")
        url = found[1]
        assert "paste the token from" in log1.read_text() and "ssh -N -L" in log1.read_text()
        # the requests below need the dashboard's HTTP server listening
        wait_until(lambda: port_open(int(found[2])), 120, f"the dashboard to listen on {url}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/version", timeout=20)
        assert refused.value.code == 401
        token = read_token()
        assert token
        request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=20) as answer:
            assert answer.status == 200 and "ray_version" in json.loads(answer.read())
        # the Jobs page names the driver's job by the sweep (issue 16)
        request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=20) as answer:
            drivers = [job for job in json.loads(answer.read()) if job["type"] == "DRIVER"]
        assert [job["metadata"]["job_name"] for job in drivers] == ["sweep s (out)"], drivers
        assert drivers[0]["metadata"]["sweep_dir"] == str(out.resolve())

        def mid_sweep():
            records = ledger_records(out)
            done = [k for k, r in records.items() if r["status"] == "completed"]
            # a trial in mid-training: a checkpoint, and several epochs still to go
            running = [k for k, r in records.items() if r["status"] == "running"
                       and 1 <= checkpoint_epoch(Path(r["run_dir"])) <= 2]
            return (done, running) if done and running else None

        done_before, running_before = wait_until(mid_sweep, 240, "a completed and a running trial")
    finally:
        driver.kill()
        driver.wait()
    end_ray_orphans(env["RAY_TMPDIR"])
    before = ledger_records(out)
    running_jobs = {k: before[k]["job_id"] for k in running_before}
    assert set(running_jobs.values()) <= squeue_ids()  # the jobs outlived the driver and its Ray processes

    log2 = tmp_path / "run2.log"
    resumed = start_driver(["--resume", "--output-dir", str(out), "--no-analyze", "--no-dashboard"], env, log2)
    assert resumed.wait(timeout=300) == 0, log2.read_text()
    text = log2.read_text()
    assert "resuming" in text and "job(s) to re-attach" in text

    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["trial_id"]) == ["t0000", "t0001", "t0002"] and set(df["status"]) == {"completed"}
    after = ledger_records(out)
    for key in done_before:
        assert after[key]["job_ids"] == before[key]["job_ids"]  # not run again
    for key, job_id in running_jobs.items():
        # re-attached to the job that kept running (it may also have finished while no driver ran)
        assert after[key]["job_ids"] == [job_id], (key, after[key]["job_ids"])
        assert len((out / "trials" / key / "starts.log").read_text().splitlines()) == 1
    every_job = [j for r in after.values() for j in r["job_ids"]]
    assert len(every_job) == len(set(every_job)) == 3  # one job per trial: nothing duplicated
    # a trial ends when its job's result is written; the job leaves squeue once its process exits
    wait_until(lambda: not (set(every_job) & squeue_ids()), 60, "every job to leave squeue")
    assert not (set(every_job) & squeue_ids())  # nothing left running
    assert not ray_orphans(env["RAY_TMPDIR"])


def test_real_training_sweep_on_slurm(slurm_cluster, tmp_path):
    """Two real digits trainings (SGD vs rwSAM, 1 epoch) as Slurm jobs, into the parquet and the report."""
    sweep = tmp_path / "real.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "real",
        "base": str(REPO / "sweeps" / "digits_lt" / "train.yaml"),
        "overrides": {"train.epochs": 1, "eval.linear_epochs": 2, "data.cache_dir": str(REPO / "data")},
        "grid": {"variants": [{"optimizer": "sgd", "rho": 0.0}, {"optimizer": "rwsam", "rho": 0.5}]},
        "max_concurrent": 2,
    }))
    out = tmp_path / "out"
    outcome = run_sweep(sweep, partition="cpu", output_dir=out, dashboard=False)
    df = pd.read_parquet(out / "results.parquet")
    assert list(df["status"]) == ["completed", "completed"], df["error"].tolist()
    assert set(df["optimizer"]) == {"sgd", "rwsam"} and (df["epochs_run"] == 1).all()
    for col in ("knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few"):
        assert df[col].between(0, 1).all(), col
    assert all(len(x) == 10 for x in df["per_class_acc"]) and (df["n_train"] > 0).all()
    assert df["git_commit"].notna().all() and set(df["partition"]) == {"cpu"}
    assert (outcome.report_dir / "best_per_ratio.md").is_file()
