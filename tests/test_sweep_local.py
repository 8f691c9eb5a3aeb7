"""The sweep driver end to end with local jobs (no Slurm): Ray Tune, ASHA per group, failures, results.

Trials run the stand-in trainer of test_sweep_standin.py (deterministic accuracy from rho; a job
with rho FAIL_RHO raises) through the real path: ltssl.launch.submit's local executor, metrics
tailing, the ledger, the parquet files and the report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_sweep_standin import FAIL_RHO, TARGET

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
    from ltssl.sweep import run_sweep

    # One trial at a time, so the order in which trials reach ASHA's rungs (and its decisions) is fixed.
    sweep = sweep_file(tmp_path, grid={"imbalance_ratio": [1, 100], "rho": [1.0, 0.05, FAIL_RHO]},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}, max_concurrent=1)
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
