"""The checkpoint store: the last two checkpoints, verified on load; a truncated or garbage last.pt
falls back to previous.pt; none good stops in one line unless starting over is allowed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ltssl.checkpoint import REQUIRED_KEYS, CheckpointStore, CorruptCheckpointError
from ltssl.config import load_config
from ltssl.train import checkpoint_now, train

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    state = {key: {} for key in REQUIRED_KEYS}
    state.update(global_step=step, model={"w": torch.randn(64, 64, generator=gen)})
    return state


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def test_keeps_the_last_two_and_loads_the_newest(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.load() is None  # nothing saved yet: a fresh start, no message
    for step in (1, 2, 3):
        store.save(_state(step))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "last.pt.sha256", "previous.pt", "previous.pt.sha256"]
    assert torch.load(tmp_path / "checkpoints" / "previous.pt", weights_only=True)["global_step"] == 2
    loaded = CheckpointStore(tmp_path / "checkpoints").load()
    assert loaded["global_step"] == 3 and torch.equal(loaded["model"]["w"], _state(3)["model"]["w"])


@pytest.mark.parametrize("damage", [_cut_in_half, _garbage], ids=["cut_in_half", "garbage"])
@pytest.mark.parametrize("with_sidecar", [True, False], ids=["sidecar", "no_sidecar"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage, with_sidecar):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    store.save(_state(2))
    damage(tmp_path / "last.pt")
    if not with_sidecar:  # judged by reading it alone
        (tmp_path / "last.pt.sha256").unlink()
    resumed = CheckpointStore(tmp_path)
    assert resumed.load()["global_step"] == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "last.pt" in message and "resuming from previous.pt" in message

    # the damaged file is moved aside, never rotated into previous.pt
    resumed.save(_state(3))
    assert CheckpointStore(tmp_path).load()["global_step"] == 3
    assert torch.load(tmp_path / "previous.pt", weights_only=True)["global_step"] == 1
    assert (tmp_path / "last.pt.corrupt").exists()


def test_a_changed_byte_is_caught_by_the_sidecar(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    store.save(_state(2))
    data = bytearray((tmp_path / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor payload: torch.load alone would not notice
    (tmp_path / "last.pt").write_bytes(bytes(data))
    assert CheckpointStore(tmp_path).load()["global_step"] == 1


def test_a_file_without_the_required_keys_is_not_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    torch.save({"model": {}}, tmp_path / "last.pt")
    (tmp_path / "last.pt.sha256").unlink()
    store.save(_state(2))  # last.pt (not judged yet) rotates into previous.pt
    _garbage(tmp_path / "last.pt")
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointStore(tmp_path).load()
    assert "previous.pt not a checkpoint (missing optimizer" in str(info.value)


def test_both_bad_is_one_line_error_or_a_fresh_start_when_allowed(tmp_path, capsys):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    store.save(_state(2))
    _cut_in_half(tmp_path / "last.pt")
    _garbage(tmp_path / "previous.pt")
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointStore(tmp_path).load()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(tmp_path) in message and "last.pt" in message and "previous.pt" in message
    assert "train.restart_on_corrupt_checkpoint=true" in message

    allowed = CheckpointStore(tmp_path, restart_on_corrupt=True)
    assert allowed.load() is None
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "starting over" in message
    allowed.save(_state(10))  # the bad files are moved aside: they can never be loaded again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.corrupt", "last.pt.sha256", "previous.pt.corrupt"]
    assert CheckpointStore(tmp_path).load()["global_step"] == 10


# ----------------------------------------------------------------------------- in a training job


class _Abort(Exception):
    pass


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("digits-cache"))
    cfg = load_config(REPO / "sweeps" / "digits_lt" / "train.yaml",
                      {"data.cache_dir": cache, "train.epochs": 2, "eval.linear_epochs": 0, "train.eval_every": 0,
                       "train.checkpoint_every": 1, "optim.weighting": "label_power"})  # rwSAM without KDE passes: faster
    full_dir = tmp_path_factory.mktemp("uninterrupted")
    train(cfg, full_dir)
    return cfg, full_dir


def _interrupted(cfg, run_dir):
    """Run until mid epoch 2 (7 steps per epoch), save there and stop: last.pt = step 9, previous.pt = end of epoch 1."""
    def hook(info):
        if info["global_step"] == 9:
            assert checkpoint_now()
            raise _Abort()

    with pytest.raises(_Abort):
        train(cfg, run_dir, step_hook=hook)
    return [torch.load(run_dir / "checkpoints" / name, weights_only=True)["global_step"] for name in ("last.pt", "previous.pt")]


def test_job_with_a_truncated_last_checkpoint_resumes_from_the_previous_and_ends_as_uninterrupted(digits, tmp_path, capfd):
    cfg, full_dir = digits
    assert _interrupted(cfg, tmp_path) == [9, 7]
    _cut_in_half(tmp_path / "checkpoints" / "last.pt")
    result = train(cfg, tmp_path)
    assert "resuming from previous.pt" in capfd.readouterr().err
    resumed_line = next(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"resumed"' in line)
    assert (resumed_line["step"], resumed_line["step_in_epoch"]) == (7, 0)
    a = torch.load(full_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result["final_loss"] == json.loads((full_dir / "result.json").read_text())["final_loss"]


def test_job_with_no_good_checkpoint_stops_in_one_line_or_starts_over_when_allowed(digits, tmp_path):
    cfg, full_dir = digits
    _interrupted(cfg, tmp_path)
    _garbage(tmp_path / "checkpoints" / "last.pt")
    _cut_in_half(tmp_path / "checkpoints" / "previous.pt")
    with pytest.raises(CorruptCheckpointError, match="train.restart_on_corrupt_checkpoint=true") as info:
        train(cfg, tmp_path)
    assert len(str(info.value).splitlines()) == 1

    allowed = load_config(REPO / "sweeps" / "digits_lt" / "train.yaml",
                          {"data.cache_dir": cfg.data.cache_dir, "train.epochs": 2, "eval.linear_epochs": 0,
                           "train.eval_every": 0, "train.checkpoint_every": 1, "optim.weighting": "label_power",
                           "train.restart_on_corrupt_checkpoint": True})
    train(allowed, tmp_path)  # from scratch: the same weights as the uninterrupted run
    a = torch.load(full_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
