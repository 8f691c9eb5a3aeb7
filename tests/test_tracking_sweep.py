"""A real training sweep on the local Slurm cluster with every tracker on, read back from each tracker:
TensorBoard over a real tensorboard process's HTTP API, the W&B offline runs' record logs, MLflow's
file store through MlflowClient; each against the trial's metrics.jsonl and the results parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ltssl.results import final_trajectory
from ltssl.tracking.common import scalars
from ltssl.tracking.wandb_run import offline_run
from test_tracking import TensorBoardServer, _close

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


def _curves(run_dir: Path, last: bool = False) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per numeric field of a trial's metrics.jsonl, each step once: the first line's
    value at a step shared by several lines (TensorBoard, MLflow), or the last one's (W&B merges the
    lines of a step into one history row)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in final_trajectory(lines):
        for key, value in scalars(line).items():
            points = curves.setdefault(key, [])
            if points and points[-1][0] == line["step"]:
                if last:
                    points[-1] = (line["step"], value)
            else:
                points.append((line["step"], value))
    return curves


def test_sweep_on_slurm_every_trial_in_tensorboard_wandb_and_mlflow(slurm_cluster, tmp_path, monkeypatch):
    from ltssl.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "tracked.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tracked",
        "base": str(REPO / "sweeps" / "digits_lt" / "train.yaml"),
        "overrides": {"train.epochs": 2, "train.eval_every": 1, "eval.linear_epochs": 2, "data.cache_dir": str(REPO / "data"),
                      "tracking.wandb_project": "ltssl-test", "tracking.wandb_mode": "offline", "tracking.mlflow": True},
        "grid": {"variants": [{"optimizer": "sgd", "rho": 0.0}, {"optimizer": "rwsam", "rho": 0.5}]},
        "max_concurrent": 2,
    }))
    out = tmp_path / "out"
    run_sweep(sweep, partition="cpu", output_dir=out, dashboard=False, analyze=False)
    df = pd.read_parquet(out / "results.parquet").set_index("trial_id")
    assert list(df["status"]) == ["completed", "completed"], df["error"].tolist()
    sweep_id = out.resolve().name
    curves = {trial: _curves(Path(row["run_dir"])) for trial, row in df.iterrows()}
    assert all(len(c["loss"]) >= 2 and len(c["knn_acc"]) == 2 for c in curves.values())  # epoch 1 and the final one

    # TensorBoard: `tensorboard --logdir <sweep folder>`, one run per trial, the HParams view
    server = TensorBoardServer(out, tmp_path / "tensorboard.log")
    try:
        for trial in df.index:
            run = f"trials/{trial}"
            server.wait_for_tags(run, {"loss", "knn_acc", "linear_acc"})
            for key in ("loss", "knn_acc", "linear_acc", "weight_mean"):
                assert _close(server.scalars(run, key), curves[trial][key]), (trial, key)
        groups = server.post("/data/plugin/hparams/session_groups",
                             {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"],
                              "colParams": [{"hparam": "optim.name"}, {"metric": {"tag": "knn_acc"}}],
                              "startIndex": 0, "sliceSize": 10})
        found = {}
        for group in groups["sessionGroups"]:
            (value,) = [m["value"] for m in group["metricValues"] if m["name"]["tag"] == "knn_acc"]
            found[group["hparams"]["optim.name"]] = value
        want = dict(zip(df["optimizer"], df["knn_acc"]))
        assert found.keys() == want.keys() and all(found[k] == pytest.approx(want[k]) for k in want)
    finally:
        server.stop()

    # W&B: one offline run per trial, id <sweep id>-<trial id>, group = the sweep, summary = the results row
    for trial, row in df.iterrows():
        (folder,) = (Path(row["run_dir"]) / "wandb").glob("offline-run-*")
        run = offline_run(folder)
        assert run["exited"]  # the job ended its run (its process is gone: the file is complete)
        assert (run["id"], run["group"], run["project"]) == (f"{sweep_id}-{trial}", sweep_id, "ltssl-test")
        assert run["config"] == {**json.loads(row["config_json"]), "_wandb": run["config"]["_wandb"]}
        history = {}
        for entry in run["history"]:
            history.setdefault(entry["_step"], {}).update(entry)
        for key, points in _curves(Path(row["run_dir"]), last=True).items():  # every numeric field, at its step
            assert _close([(s, history[s][key]) for s, _ in points], points), (trial, key)
        summary = run["summary"]
        assert (summary["status"], summary["group"], summary["trial_id"]) == ("completed", row["group"], trial)
        assert summary["knn_acc"] == pytest.approx(row["knn_acc"]) and summary["linear_acc"] == pytest.approx(row["linear_acc"])

    # MLflow: the file store under the sweep folder, trials nested under the sweep's parent run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient(tracking_uri=f"file:{out.resolve() / 'mlruns'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "ltssl"]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {sweep_id, *df.index}
    parent = runs[sweep_id].info.run_id
    for trial, row in df.iterrows():
        run = runs[trial]
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
        optim = json.loads(row["config_json"])["optim"]
        assert (run.data.params["optim.name"], run.data.params["optim.rho"]) == (row["optimizer"], str(optim["rho"]))
        for key in ("loss", "knn_acc"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert _close(history, curves[trial][key]), (trial, key)
        assert run.data.metrics["linear_acc"] == pytest.approx(row["linear_acc"])
        assert run.data.tags["result.status"] == "completed"
