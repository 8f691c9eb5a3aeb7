"""The training job: digits end to end, metrics/checkpoint/result formats, resume = uninterrupted,
DDP (2 gloo processes) = 1 process, the NaN guard, checkpoint_now from a signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ltssl.methods.simsiam as simsiam_module
from ltssl.config import load_config
from ltssl.methods import build_method
from ltssl.optim import build_optimizer
from ltssl.train import NonFiniteLossError, checkpoint_now, train, train_step

REPO = Path(__file__).resolve().parents[1]
DIGITS_YAML = REPO / "sweeps" / "digits_lt" / "train.yaml"
RESULT_KEYS = {"knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few", "per_class_acc", "ood_linear_acc", "epochs_run",
               "train_time_s", "n_train", "num_classes", "class_counts", "world_size", "final_loss"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits-cache"))


def _cfg(cache_dir, **overrides):
    base = {"data.cache_dir": cache_dir, "train.epochs": 2, "eval.linear_epochs": 5, "train.eval_every": 1}
    base.update(overrides)
    return load_config(DIGITS_YAML, base)


def _lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_simsiam_rwsam_kde_on_digits_writes_metrics_checkpoint_and_result(cache_dir, tmp_path):
    cfg = _cfg(cache_dir)
    result = train(cfg, tmp_path / "run")
    assert RESULT_KEYS <= set(result)
    assert result["epochs_run"] == 2 and result["world_size"] == 1 and result["n_train"] == sum(result["class_counts"])
    assert len(result["per_class_acc"]) == result["num_classes"] == 10
    for key in ("knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few"):
        assert 0.0 <= result[key] <= 1.0
    assert result["knn_acc"] > 0.3  # far above chance (0.1) even after 2 epochs
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert (tmp_path / "run" / "config.yaml").exists()

    lines = _lines(tmp_path / "run")
    assert all({"epoch", "step", "time"} <= set(line) for line in lines)
    steps = [line for line in lines if "loss" in line]
    assert steps and all({"loss", "lr", "images_per_s", "weight_mean", "weight_max"} <= set(s) for s in steps)
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)
    refresh = [line for line in lines if line.get("kde_refresh")]
    assert len(refresh) == 2 and refresh[-1]["dataset_weight_max"] > 1.0  # KDE weights recomputed every epoch, not uniform
    assert refresh[-1]["dataset_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert all(s["weight_max"] >= s["weight_mean"] > 0 for s in steps) and steps[-1]["weight_max"] > 1.0
    assert any("knn_acc" in line and not line.get("final") for line in lines)
    assert lines[-1]["final"] is True and RESULT_KEYS <= set(lines[-1])

    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "schedule", "epoch", "step_in_epoch", "rng", "weights", "config"} <= set(state)
    assert state["epoch"] == 2 and state["weights"]["per_sample"].shape == (result["n_train"],)
    assert "base" in state["optimizer"] and state["optimizer"]["base"]["state"]  # SAM's SGD momentum
    # a finished job started again returns its result without training again
    assert train(cfg, tmp_path / "run") == result


@pytest.mark.parametrize("method,optim", [("simclr", "sam"), ("moco_v2", "rwsam"), ("supervised", "sgd")])
def test_other_methods_train_on_digits(cache_dir, tmp_path, method, optim):
    cfg = _cfg(cache_dir, **{"method.name": method, "optim.name": optim, "optim.weighting": "label_power",
                             "train.epochs": 1, "train.eval_every": 0, "eval.linear_epochs": 2})
    result = train(cfg, tmp_path / "run")
    assert RESULT_KEYS <= set(result) and result["epochs_run"] == 1
    assert result["final_loss"] == result["final_loss"]  # finite, not NaN
    steps = [line for line in _lines(tmp_path / "run") if "loss" in line]
    if optim == "rwsam":  # label_power weights of the drawn samples: 1.2 ** rank, mean 1 over the dataset
        assert steps[0]["weight_max"] > 1.0 and steps[0]["weight_max"] != steps[0]["weight_mean"]
    else:
        assert all(s["weight_mean"] == s["weight_max"] == 1.0 for s in steps)


class _Abort(Exception):
    pass


def _resume_cfg(cache_dir):
    return _cfg(cache_dir, **{"train.eval_every": 0, "eval.linear_epochs": 0, "train.checkpoint_every": 5})


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, train(_resume_cfg(cache_dir), run_dir)


@pytest.mark.parametrize("sender", ["main_thread", "foreign_thread"])
def test_resume_after_signal_equals_uninterrupted_run(cache_dir, tmp_path, uninterrupted, sender):
    """SIGUSR2 sent between steps is held until the next step is done; the handler saves and aborts.

    ``main_thread``: the signal is directed at the training thread, which blocks it during steps.
    ``foreign_thread``: a thread started before train() (as OpenBLAS's pool is in a job process)
    takes it with nothing blocked; CPython would run the handler mid-step without the trainer's gate.
    Either way the resumed run (mid-epoch, with the KDE weights, BN statistics and SGD momentum
    restored) ends with weights identical to an uninterrupted run's.
    """
    cfg = _resume_cfg(cache_dir)
    full_dir, full = uninterrupted
    fire, taken, cancelled = threading.Event(), threading.Event(), threading.Event()

    def foreign_thread():  # its signal mask is the test's: nothing blocked
        fire.wait()
        if not cancelled.is_set():
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        taken.set()

    seen = {}

    def on_usr2(signum, frame):
        from ltssl import train as train_module

        seen["step"] = train_module._ACTIVE.global_step
        assert checkpoint_now()
        raise _Abort()

    def hook(info):
        if info["global_step"] == 9:  # mid epoch 2 (7 steps per epoch)
            if sender == "main_thread":
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
            else:
                fire.set()
                taken.wait(5)  # the signal is taken now, and the next step starts right after

    thread = threading.Thread(target=foreign_thread, daemon=True)
    thread.start()
    previous = signal.signal(signal.SIGUSR2, on_usr2)
    try:
        with pytest.raises(_Abort):
            train(cfg, tmp_path / "cut", step_hook=hook)
    finally:
        cancelled.set()  # the thread must not signal once the handler is gone
        fire.set()
        thread.join(5)
        signal.signal(signal.SIGUSR2, previous)
    assert seen["step"] == 10  # delivered at the boundary after the next step, not inside it
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 3, 10)
    assert not checkpoint_now()  # no trainer running

    resumed = train(cfg, tmp_path / "cut")
    a, b = _weights(full_dir), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["knn_acc"] == full["knn_acc"] and resumed["final_loss"] == full["final_loss"]
    assert any(line.get("resumed") for line in _lines(tmp_path / "cut"))


def test_nonfinite_loss_stops_the_job_naming_epoch_and_step(cache_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = simsiam_module.negative_cosine

    def poisoned(p, z):
        calls["n"] += 1
        out = real(p, z)
        return out * float("nan") if calls["n"] > 2 * 2 else out  # 2 calls per step: step 3 is NaN

    monkeypatch.setattr(simsiam_module, "negative_cosine", poisoned)
    cfg = _cfg(cache_dir, **{"optim.name": "sgd", "train.epochs": 1, "train.log_every": 1})
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at epoch 1 step 3$"):
        train(cfg, tmp_path / "run")


class _RecordingTracker:
    def __init__(self):
        self.lines, self.closed = [], []

    def log(self, line):
        self.lines.append(dict(line))

    def close(self, result):
        self.closed.append(result)


def test_tracker_gets_every_metrics_line_and_the_result_or_none_when_stopped(cache_dir, tmp_path, monkeypatch):
    import ltssl.train as train_module

    trackers = []

    def open_tracker(cfg, run_dir):
        trackers.append(_RecordingTracker())
        trackers[-1].run_dir = Path(run_dir)
        return trackers[-1]

    monkeypatch.setattr(train_module, "open_tracker", open_tracker)
    cfg = _cfg(cache_dir, **{"train.epochs": 1, "eval.linear_epochs": 0, "train.log_every": 2})
    result = train(cfg, tmp_path / "run")
    assert len(trackers) == 1 and trackers[0].closed == [result] and trackers[0].run_dir == tmp_path / "run"
    assert trackers[0].lines == _lines(tmp_path / "run")  # every line of metrics.jsonl, in order
    assert trackers[0].lines[-1]["final"] is True

    monkeypatch.setattr(simsiam_module, "negative_cosine", lambda p, z: (p * z).sum(1) * float("nan"))
    with pytest.raises(NonFiniteLossError):
        train(_cfg(cache_dir, **{"train.epochs": 1, "train.log_every": 1}), tmp_path / "run-nan")
    assert len(trackers) == 2 and trackers[1].closed == [None]
    assert trackers[1].lines == _lines(tmp_path / "run-nan")


def test_step_throughput_excludes_the_kde_refresh(cache_dir, tmp_path, monkeypatch):
    """The refresh is made to last 10^6 s on the trainer's clock: the step lines' windows must not contain it."""
    import ltssl.train as train_module

    clock = {"offset": 0.0}
    real_time, real_kde = train_module.time.time, train_module.kde_weights

    def slow_kde(*args, **kwargs):
        out = real_kde(*args, **kwargs)
        clock["offset"] += 1e6
        return out

    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(time=lambda: real_time() + clock["offset"]))
    monkeypatch.setattr(train_module, "kde_weights", slow_kde)
    cfg = _cfg(cache_dir, **{"train.epochs": 2, "train.log_every": 2, "train.eval_every": 0, "eval.linear_epochs": 0})
    train(cfg, tmp_path / "run")
    lines = _lines(tmp_path / "run")
    refreshes = [i for i, line in enumerate(lines) if line.get("kde_refresh")]
    assert len(refreshes) == 2 and all(lines[i]["refresh_s"] >= 1e6 for i in refreshes)
    for i in refreshes:  # the first step line after each refresh: 2 steps of 64 images in well under 10^6 s
        first = next(line for line in lines[i + 1:] if "loss" in line)
        assert first["images_per_s"] > 2 * 64 / 1e6


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_cfg(method):
    return load_config({"model": {"backbone": "small_cnn", "norm": "group"}, "data": {"image_size": 8},
                        "method": {"name": method, "proj_dim": 16, "proj_hidden_dim": 16, "pred_hidden_dim": 8,
                                   "moco_queue_size": 32},
                        "optim": {"name": "rwsam", "lr": 0.1, "rho": 0.5, "adaptive": True}})


def _global_batches(steps=2, n=8):
    gen = torch.Generator().manual_seed(0)
    return [{"views": [torch.randn(n, 3, 8, 8, generator=gen) for _ in range(2)], "label": torch.randint(0, 4, (n,), generator=gen),
             "index": torch.arange(n), "weight": torch.rand(n, generator=gen) + 0.5} for _ in range(steps)]


def _run_steps(method_name, batches, rank=0, world=1):
    torch.manual_seed(0)
    cfg = _ddp_cfg(method_name)
    method = build_method(cfg, 4)
    model = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False) if world > 1 else method
    opt = build_optimizer(cfg.optim, method)
    for batch in batches:
        n = batch["label"].shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        local = {"views": [v[part] for v in batch["views"]], "label": batch["label"][part], "index": batch["index"][part]}
        train_step(model, opt, local, batch["weight"][part])
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from ltssl.train import setup_distributed

    setup_distributed("cpu")
    try:
        for name in ("simsiam", "simclr", "moco_v2"):
            state = _run_steps(name, _global_batches(), rank, world)
            if rank == 0:
                torch.save(state, os.path.join(out_dir, f"{name}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_over_the_same_global_batch(tmp_path):
    """rwSAM steps (weighted ascent, unweighted update) with a GroupNorm model: weights equal to float tolerance.

    SimCLR gathers negatives across ranks (with gradients); MoCo enqueues the gathered keys.
    """
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name in ("simsiam", "simclr", "moco_v2"):
        single = _run_steps(name, _global_batches())
        double = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for key, value in single.items():
            if value.is_floating_point():
                assert torch.allclose(value, double[key], atol=1e-5, rtol=1e-4), (name, key)
            else:
                assert torch.equal(value, double[key]), (name, key)
