"""The sweep driver end to end with local jobs (no Slurm): Ray Tune, ASHA per group, failures, results.

Trials run the stand-in trainer of test_sweep_standin.py (deterministic accuracy from rho; a job
with rho FAIL_RHO raises) through the real path: ltssl.launch.submit's local executor, metrics
tailing, the ledger, the parquet files and the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ltssl.sweep import run_sweep
from test_sweep_standin import (
    FAIL_RHO,
    TARGET,
    checkpoint_epoch,
    end_ray_orphans,
    ledger_records,
    ray_orphans,
    start_driver,
    sweep_env,
)
from waiting import wait_until

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def standin_importable(monkeypatch, tmp_path):
    """The jobs import the stand-in: tests/ on PYTHONPATH (inherited by Ray workers and jobs)."""
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.chdir(tmp_path)


def sweep_file(tmp_path: Path, **tree) -> Path:
    base = {"data": {"dataset": "digits", "cache_dir": str(tmp_path / "data")}, "train": {"epochs": 3, "eval_every": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": base, **tree}, sort_keys=False))
    return path


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_local_sweep_asha_stops_within_groups_failures_are_recorded(tmp_path):
    # Two at a time, in pairs of different ratios: rho 1.0 at r = 1 and r = 100 first (each the first
    # of its group), then rho 0.05 at both ratios, then the failing jobs: ASHA's decisions are fixed.
    sweep = sweep_file(tmp_path, grid={"rho": [1.0, 0.05, FAIL_RHO], "imbalance_ratio": [1, 100]},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}, max_concurrent=2)
    out = tmp_path / "out"
    outcome = run_sweep(sweep, output_dir=out, target=TARGET, target_kwargs={"epoch_s": 1.0, "steps_per_epoch": 4}, prepare=False)
    df = pd.read_parquet(out / "results.parquet").set_index("trial_id")
    assert len(df) == 6 and outcome.counts["completed"] + outcome.counts["stopped_early"] + outcome.counts["failed"] == 6
    status = {(r.imbalance_ratio, r.rho): r.status for r in df.itertuples()}
    # rho 1.0 runs first in each ratio and completes; rho 0.05 is worse at epoch 1 than rho 1.0 of the
    # SAME ratio (and better than rho 1.0 at ratio 100, which it must not be compared with)
    assert status == {(1.0, 1.0): "completed", (1.0, 0.05): "stopped_early", (1.0, FAIL_RHO): "failed",
                      (100.0, 1.0): "completed", (100.0, 0.05): "stopped_early", (100.0, FAIL_RHO): "failed"}
    for trial, row in df.iterrows():
        run_dir = Path(row["run_dir"])
        job = json.loads((run_dir / "job.json").read_text())
        if row["status"] == "stopped_early":
            assert "cancelled" in job, trial               # the job was cancelled ...
            assert not alive(int(job["job_id"])), trial   # ... and its process is gone
            # stopped at epoch 1's evaluation; cancelled within a step or two, long before epoch 3
            epochs = {json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()}
            assert max(epochs) <= 2 and row["epochs_run"] == 1, (trial, epochs)
            assert not (run_dir / "result.json").exists() and pd.isna(row["linear_acc"])
        elif row["status"] == "failed":
            assert "stand-in failure" in row["error"] and "Traceback" in row["error"], row["error"]
        else:
            assert row["epochs_run"] == 3 and row["linear_acc"] > 0 and pd.isna(row["error"])
            assert row["group"] == f"digits/r={row['imbalance_ratio']:g}/lt/simsiam"
    # one parquet row per trial; every metrics line of every trial in metrics.parquet
    metrics = pd.read_parquet(out / "metrics.parquet")
    lines = sum(len((Path(r) / "metrics.jsonl").read_text().splitlines()) for r in df["run_dir"])
    assert len(metrics) == lines and set(metrics["trial_id"]) == set(df.index)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "learning_curves.png").is_file()
    ledger = {p.stem: json.loads(p.read_text()) for p in (out / "ledger").glob("t*.json")}
    assert {k: v["status"] for k, v in ledger.items()} == df["status"].to_dict()


def test_resume_after_the_driver_is_killed_runs_every_trial_exactly_once(tmp_path):
    """SIGKILL the driver mid-sweep, then --resume: finished trials are kept, the others continue."""
    sweep = sweep_file(tmp_path, grid={"rho": [1.0, 0.5, 0.3]}, max_concurrent=2)
    sweep.write_text(sweep.read_text().replace("epochs: 3", "epochs: 5"))
    out = tmp_path / "out"
    env = sweep_env(tmp_path, epoch_s=0.8)
    driver = start_driver(["--config", str(sweep), "--output-dir", str(out), "--no-analyze"], env, tmp_path / "run1.log")

    def mid_sweep():
        records = ledger_records(out)
        done = [k for k, r in records.items() if r["status"] == "completed"]
        # a trial in mid-training: a checkpoint, and several epochs still to go
        running = [k for k, r in records.items() if r["status"] == "running"
                   and 1 <= checkpoint_epoch(Path(r["run_dir"])) <= 2]
        return (done, running) if done and running else None

    done_before, running_before = wait_until(mid_sweep, 180, "a completed and a running trial")
    driver.kill()
    driver.wait()
    end_ray_orphans(env["RAY_TMPDIR"])  # Ray helpers a SIGKILLed driver leaves behind
    before = ledger_records(out)
    starts_before = {k: (out / "trials" / k / "starts.log").read_text() for k in done_before}

    resumed = start_driver(["--resume", "--output-dir", str(out), "--no-analyze"], env, tmp_path / "run2.log")
    assert resumed.wait(timeout=240) == 0, (tmp_path / "run2.log").read_text()
    log = (tmp_path / "run2.log").read_text()
    assert "resuming" in log

    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["trial_id"]) == ["t0000", "t0001", "t0002"]   # every trial exactly once
    assert set(df["status"]) == {"completed"}
    after = ledger_records(out)
    for key in done_before:  # finished before the kill: not run again
        assert after[key]["job_ids"] == before[key]["job_ids"]
        assert (out / "trials" / key / "starts.log").read_text() == starts_before[key]
    for key in running_before:
        starts = [line.split() for line in (out / "trials" / key / "starts.log").read_text().splitlines()]
        if after[key]["job_ids"] == before[key]["job_ids"]:
            assert len(starts) == 1  # re-attached to the job that kept running
        else:
            assert int(starts[-1][1]) >= 1, starts  # resubmitted: resumed from its checkpoint, not epoch 0
        epochs = [json.loads(x)["epoch"] for x in (out / "trials" / key / "metrics.jsonl").read_text().splitlines()
                  if "knn_acc" in x and "final" not in x]
        assert sorted(set(epochs)) == [1, 2, 3, 4, 5]
    assert not ray_orphans(env["RAY_TMPDIR"])
    # no job of the sweep still runs: a trial ends when its job's result is written, and the job's
    # controller exits right after, so wait for exactly that exit
    controllers = {key: int(json.loads((out / "trials" / key / "job.json").read_text())["job_id"]) for key in after}
    wait_until(lambda: not any(alive(pid) for pid in controllers.values()), 60, "every job's controller to exit")
    for key, pid in controllers.items():
        assert not alive(pid), key
