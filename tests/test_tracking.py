"""Trackers (ltssl.tracking): TensorBoard read back by a real tensorboard process over HTTP, the W&B
offline run's record log, MLflow's file store through MlflowClient, requeues, errors, preflight."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import ltssl.tracking as tracking
from ltssl.config import ConfigError, load_config
from ltssl.results import final_trajectory
from ltssl.tracking import check, end_sweep_parent, open_tracker, sweep_parent
from ltssl.tracking.common import Tracker, scalars
from ltssl.tracking.wandb_run import offline_run
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
TENSORBOARD = Path(sys.executable).parent / "tensorboard"
RESULT = {"knn_acc": 0.625, "linear_acc": 0.75, "per_class_acc": [0.5, 1.0], "epochs_run": 3, "final_loss": 0.25,
          "train_time_s": 12.5, "n_train": 40, "class_counts": [30, 10]}


def _lines(first: int, last: int, scale: float, start_time: float = 1.0e9) -> list[dict]:
    """Metrics lines of steps first..last (5 steps per epoch, an evaluation line at each epoch end)."""
    lines = []
    for step in range(first, last + 1):
        epoch = (step - 1) // 5 + 1
        lines.append({"epoch": epoch, "step": step, "loss": scale / step, "lr": 0.1, "images_per_s": 100.0 + step,
                      "time": start_time + step})
        if step % 5 == 0 and step < 15:
            lines.append({"epoch": epoch, "step": step, "knn_acc": scale * step / 100, "epoch_loss": scale / step,
                          "time": start_time + step + 0.5})
    return lines


def _requeued_trial(tracker_for) -> list[dict]:
    """Feed one trial the way a requeued job does: attempt 1 logs steps 1..12 and stops (no result);
    attempt 2 resumes from the checkpoint at step 10, re-runs 11..12 and ends at 15. Returns every line."""
    first = _lines(1, 12, 1.0)
    refresh = {"epoch": 3, "step": 10, "weight_mean": 1.5, "time": 1.0e9 + 10.7}  # epoch 3 starts after the checkpoint
    first.insert(first.index(next(x for x in first if x["step"] == 11)), refresh)
    tracker = tracker_for()
    for line in first:
        tracker.log(line)
    tracker.close(None)
    second = [{"epoch": 3, "step": 10, "resumed": True, "step_in_epoch": 0, "time": 2.0e9}, dict(refresh, time=2.0e9 + 0.5)]
    second += _lines(11, 15, 2.0, 2.0e9)
    second.append({"epoch": 3, "step": 15, "final": True, **RESULT, "time": 2.0e9 + 20})
    tracker = tracker_for()
    for line in second:
        tracker.log(line)
    tracker.close(RESULT)
    return first + second


def _trial_dir(tmp_path: Path, trial_id: str = "t0003") -> Path:
    run_dir = tmp_path / "demo-20261130-000000" / "trials" / trial_id
    run_dir.mkdir(parents=True)
    return run_dir


def _expected(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per key of the lines that stand once a resumed attempt replaced its re-run steps."""
    curves: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for line in final_trajectory(lines):
        for key, value in scalars(line).items():
            if not curves[key] or curves[key][-1][0] != line["step"]:
                curves[key].append((line["step"], value))
    return curves


def _exited(folders: list[Path]) -> list[dict] | None:
    """The offline runs in ``folders`` once each holds its end record (W&B's core writes after finish())."""
    runs = [offline_run(f) for f in folders]
    return runs if all(r["exited"] for r in runs) else None


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag of every event file in ``folder``, in file order."""
    curves: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tensor.float_val:
                    curves[value.tag].append((event.step, value.tensor.float_val[0]))
    return curves


class TensorBoardServer:
    """A real ``tensorboard`` process on 127.0.0.1 (a free port), read over its HTTP API."""

    def __init__(self, logdir: Path, log: Path):
        self.log = log
        self.proc = subprocess.Popen([str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
        found = wait_until(lambda: re.search(r"http://127\.0\.0\.1:\d+", log.read_text()), 120,
                           "tensorboard to print its URL")
        self.url = found[0]

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        return [(step, value) for _, step, value in self.get(f"/data/plugin/scalars/scalars?{query}")]

    def wait_for_tags(self, run: str, tags: set[str]) -> dict:
        def loaded():
            found = self.get("/data/plugin/scalars/tags").get(run, {})
            return found if tags <= set(found) else None

        return wait_until(loaded, 120, f"tensorboard to load {sorted(tags)} of run {run}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same steps, values equal to float32 precision (TensorBoard stores float32)."""
    return [s for s, _ in got] == [s for s, _ in want] and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want))


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_one_run_per_trial_requeue_replaces_rerun_steps_read_over_http(tmp_path):
    run_dir = _trial_dir(tmp_path)
    cfg = load_config(overrides=["optim.rho=0.25"])
    lines = _requeued_trial(lambda: open_tracker(cfg, run_dir))
    want = _expected(lines)
    assert [s for s, _ in want["loss"]] == list(range(1, 16))

    on_disk = event_scalars(run_dir)  # two event files (two attempts), each step once per tag
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    for key in ("loss", "lr", "images_per_s", "knn_acc", "epoch_loss", "epoch", "linear_acc", "final_loss"):
        assert _close(on_disk[key], want[key]), (key, on_disk[key], want[key])
    assert on_disk["weight_mean"] == [(10, 1.5)]  # the line at the checkpoint's step, logged again on resume: once
    assert "step_in_epoch" not in on_disk and "per_class_acc" not in on_disk  # markers and lists are no curves

    server = TensorBoardServer(tmp_path / "demo-20261130-000000", tmp_path / "tensorboard.log")
    try:
        run = "trials/t0003"
        tags = server.wait_for_tags(run, {"loss", "knn_acc", "linear_acc"})
        assert set(tags) >= {"loss", "lr", "images_per_s", "knn_acc", "epoch_loss", "epoch", "final_loss"}
        for key in ("loss", "knn_acc", "linear_acc"):
            assert _close(server.scalars(run, key), want[key]), key
        experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"optim.rho", "optim.name", "data.imbalance_ratio", "tracking.tensorboard"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"knn_acc", "linear_acc"} <= metrics
        groups = server.post("/data/plugin/hparams/session_groups",
                             {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN", "STATUS_RUNNING"],
                              "colParams": [{"hparam": "optim.rho"}, {"metric": {"tag": "knn_acc"}}],
                              "startIndex": 0, "sliceSize": 10})
        (group,) = groups["sessionGroups"]
        assert group["hparams"]["optim.rho"] == 0.25
        (value,) = [m["value"] for m in group["metricValues"] if m["name"]["tag"] == "knn_acc"]
        assert value == pytest.approx(RESULT["knn_acc"])
    finally:
        server.stop()


# ----------------------------------------------------------------------------- Weights & Biases


def test_wandb_offline_run_holds_the_trials_history_config_and_results_row(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = _trial_dir(tmp_path)
    cfg = load_config(overrides=["tracking.wandb_project=ltssl-test", "tracking.tensorboard=false", "optim.rho=0.25"])
    check(cfg)  # offline needs no login
    lines = _requeued_trial(lambda: open_tracker(cfg, run_dir))
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # one per attempt; `wandb sync` of both continues one run
    runs = wait_until(lambda: _exited(folders), 60, "W&B's core process to write both runs' ends")
    for run in runs:
        assert run["id"] == "demo-20261130-000000-t0003" and run["group"] == "demo-20261130-000000"
        assert run["project"] == "ltssl-test"
        assert run["config"]["optim"]["rho"] == 0.25 and run["config"]["tracking"]["wandb_project"] == "ltssl-test"
    history = [row for run in runs for row in run["history"]]
    logged = collections.defaultdict(dict)
    for row in history:
        logged[row["_step"]].update({k: v for k, v in row.items() if not k.startswith("_")})
    want = collections.defaultdict(dict)  # W&B merges the lines of one step into one row: the last value stands
    for line in final_trajectory(lines):
        want[line["step"]].update(scalars(line))
    assert logged.keys() == want.keys()
    for step, values in want.items():  # every numeric field of every line, at its step
        assert logged[step] == pytest.approx(values), step
    summary = runs[-1]["summary"]  # the results row
    assert summary["trial_id"] == "t0003" and summary["sweep_id"] == "demo-20261130-000000"
    assert summary["status"] == "completed" and summary["knn_acc"] == RESULT["knn_acc"]
    assert summary["per_class_acc"] == RESULT["per_class_acc"] and summary["rho"] == 0.25


def test_wandb_online_without_login_or_a_missing_package_is_one_line_before_submitting(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = load_config(overrides=["tracking.wandb_project=ltssl-test"])
    with pytest.raises(ConfigError) as error:
        check(cfg)
    assert str(error.value) == ("tracking.wandb_project 'ltssl-test': not logged in to W&B (run `wandb login`, "
                                "set WANDB_API_KEY, or tracking.wandb_mode=offline)")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    check(cfg)  # `wandb login` wrote a netrc entry
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    check(load_config(overrides=["tracking.wandb_project=ltssl-test", "tracking.wandb_mode=offline"]))

    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real_find_spec(name))
    with pytest.raises(ConfigError, match=r"^tracking\.mlflow: the mlflow package is not installed \(make install installs it\)$"):
        check(load_config(overrides=["tracking.mlflow=true"]))
    with pytest.raises(ConfigError, match=r"^tracking\.wandb_mode must be one of online, offline, got 'cloud'$"):
        load_config(overrides=["tracking.wandb_mode=cloud"])


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_runs_nested_under_the_sweeps_parent_with_params_stepped_metrics_and_results(tmp_path, monkeypatch):
    run_dir = _trial_dir(tmp_path)
    sweep_dir = run_dir.parents[1]
    cfg = load_config(overrides=["tracking.mlflow=true", "tracking.tensorboard=false", "optim.rho=0.25"])
    parent = sweep_parent(cfg, sweep_dir, {"metric": "knn_acc", "mode": "max"})
    assert sweep_parent(cfg, sweep_dir) == parent  # made once: a resumed sweep, or a job, gets the same
    lines = _requeued_trial(lambda: open_tracker(cfg, run_dir))
    end_sweep_parent(cfg, sweep_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient(tracking_uri=f"file:{sweep_dir / 'mlruns'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "ltssl"]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"demo-20261130-000000", "t0003"}  # the requeue continued the trial's run
    top, trial = runs["demo-20261130-000000"], runs["t0003"]
    assert top.info.run_id == parent and top.info.status == "FINISHED"
    assert top.data.params == {"metric": "knn_acc", "mode": "max"}
    assert trial.data.tags["mlflow.parentRunId"] == parent and trial.info.status == "FINISHED"
    assert trial.data.params["optim.rho"] == "0.25" and trial.data.params["train.epochs"] == "10"
    assert len(trial.data.params) == len(tracking.common.flat_config(cfg))

    # every step once; a re-run step keeps the first attempt's value (a real re-run is identical)
    once = collections.defaultdict(dict)
    for line in lines:
        for key, value in scalars(line).items():
            once[key].setdefault(line["step"], value)
    for key in ("loss", "knn_acc", "epoch", "images_per_s", "weight_mean"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(trial.info.run_id, key))
        assert history == sorted(once[key].items()), key
    # the results row: its numbers as final metrics, its text as tags
    assert trial.data.metrics["knn_acc"] == RESULT["knn_acc"] and trial.data.metrics["rho"] == 0.25
    assert trial.data.metrics["n_train"] == RESULT["n_train"]
    assert trial.data.tags["result.status"] == "completed" and trial.data.tags["result.trial_id"] == "t0003"


def test_mlflow_sweep_end_closes_the_runs_of_cancelled_trials(tmp_path, monkeypatch):
    """A trial stopped early has its job cancelled before it can close its run: the sweep's end does."""
    finished, stopped = _trial_dir(tmp_path, "t0000"), _trial_dir(tmp_path, "t0001")
    sweep_dir = finished.parents[1]
    cfg = load_config(overrides=["tracking.mlflow=true", "tracking.tensorboard=false"])
    sweep_parent(cfg, sweep_dir)
    done = open_tracker(cfg, finished)
    done.log({"epoch": 0, "step": 1, "loss": 1.0})
    done.close(RESULT)
    cancelled = open_tracker(cfg, stopped)
    cancelled.log({"epoch": 0, "step": 1, "loss": 2.0})  # then the job is cancelled: no close()
    end_sweep_parent(cfg, sweep_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{sweep_dir / 'mlruns'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "ltssl"]
    status = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert status == {sweep_dir.name: "FINISHED", "t0000": "FINISHED", "t0001": "KILLED"}


# ----------------------------------------------------------------------------- errors


class _Raising(Tracker):
    def __init__(self, cfg, ident):
        pass

    def log(self, line):
        raise RuntimeError("tracker server unreachable")


def test_a_failing_tracker_is_logged_once_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", (__name__, "_Raising"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = _trial_dir(tmp_path)
    cfg = load_config(overrides=["tracking.wandb_project=p"])
    with caplog.at_level(logging.WARNING, logger="ltssl.tracking"):
        lines = _requeued_trial(lambda: open_tracker(cfg, run_dir))
    warnings = [r for r in caplog.records if r.name == "ltssl.tracking"]
    assert len(warnings) == 2  # once per job (two attempts), not once per line
    assert all("wandb is off for the rest of this job" in r.getMessage() and "tracker server unreachable" in r.getMessage()
               for r in warnings)
    assert _close(event_scalars(run_dir)["loss"], _expected(lines)["loss"])  # TensorBoard got everything

    def fails_to_open(cfg, ident):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(sys.modules[__name__], "_Raising", fails_to_open)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ltssl.tracking"):
        tracker = open_tracker(cfg, _trial_dir(tmp_path / "b"))
        for line in _lines(1, 10, 1.0):
            tracker.log(line)
        tracker.close(None)
    (warning,) = [r for r in caplog.records if r.name == "ltssl.tracking"]
    assert "ConnectionError: no route to host" in warning.getMessage()


@pytest.mark.slow
def test_training_goes_on_when_a_tracker_raises(tmp_path, monkeypatch, caplog):
    """A real digits training with a tracker that raises on every line: the job completes."""
    from ltssl.train import train

    monkeypatch.setitem(tracking.TRACKERS, "wandb", (__name__, "_Raising"))
    cfg = load_config(REPO / "sweeps" / "digits_lt" / "train.yaml",
                      {"data.cache_dir": str(tmp_path / "data"), "train.epochs": 2, "eval.linear_epochs": 2,
                       "tracking.wandb_project": "p", "tracking.wandb_mode": "offline"})
    with caplog.at_level(logging.WARNING, logger="ltssl.tracking"):
        result = train(cfg, tmp_path / "run")
    assert result["epochs_run"] == 2 and 0 <= result["knn_acc"] <= 1
    assert len([r for r in caplog.records if r.name == "ltssl.tracking"]) == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert _close(event_scalars(tmp_path / "run")["loss"], _expected(lines)["loss"])
    assert event_scalars(tmp_path / "run")["knn_acc"][-1][1] == pytest.approx(result["knn_acc"])


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_training_continues_each_trackers_run_without_duplicated_steps(tmp_path, monkeypatch):
    """A real digits training cut mid-epoch 2 (its checkpoint is epoch 1's), then resumed in the same
    run folder: TensorBoard, W&B and MLflow each hold one run whose steps continue, each step once."""
    from ltssl.train import train

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = _trial_dir(tmp_path)
    cfg = load_config(REPO / "sweeps" / "digits_lt" / "train.yaml",
                      {"data.cache_dir": str(tmp_path / "data"), "train.epochs": 2, "train.eval_every": 1,
                       "train.log_every": 1, "eval.linear_epochs": 2, "optim.name": "sgd",
                       "tracking.wandb_project": "ltssl-test", "tracking.wandb_mode": "offline", "tracking.mlflow": True})

    def hook(info):
        if info["epoch"] == 1 and info["step_in_epoch"] == 2:
            raise _Stop()

    with pytest.raises(_Stop):
        train(cfg, run_dir, step_hook=hook)
    result = train(cfg, run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (resumed,) = [line for line in lines if line.get("resumed")]
    cut = lines.index(resumed)
    first_attempt_last = max(line["step"] for line in lines[:cut])
    assert any("loss" in line and line["step"] <= first_attempt_last for line in lines[cut:])  # steps were re-run
    want = _expected(lines)

    tensorboard = event_scalars(run_dir)
    for key in ("loss", "lr", "knn_acc", "linear_acc"):
        assert _close(tensorboard[key], want[key]), key

    runs = wait_until(lambda: _exited(sorted((run_dir / "wandb").glob("offline-run-*"))), 60,
                      "W&B's core process to write both runs' ends")
    assert len(runs) == 2 and {r["id"] for r in runs} == {"demo-20261130-000000-t0003"}
    steps = [row["_step"] for row in runs[1]["history"]]
    assert steps == sorted(set(steps)) and steps[0] > resumed["step"]  # the second attempt goes on after the checkpoint
    assert runs[1]["summary"]["knn_acc"] == pytest.approx(result["knn_acc"])

    client = MlflowClient(tracking_uri=f"file:{run_dir.parents[1] / 'mlruns'}")
    (trial,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.info.run_name == "t0003"]
    history = [m.step for m in client.get_metric_history(trial.info.run_id, "loss")]
    assert sorted(history) == [s for s, _ in want["loss"]]  # each step once
    assert trial.info.status == "FINISHED" and trial.data.metrics["knn_acc"] == pytest.approx(result["knn_acc"])
