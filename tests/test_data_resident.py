"""The device-resident loader: the streaming loader's batches, seeds, rank shards, resume; its decoded cache; the choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ltssl.config import load_config
from ltssl.data import DataError
from ltssl.data import ffcv as lf
from ltssl.data import resident as R
from ltssl.data.ffcv import SSLLoader, write_beton
from test_data_util import cifar_images

N, C = 320, 10
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")
KW = dict(batch_size=32, num_views=3, image_size=24, recipe="cifar", seed=7, device=CPU)


@pytest.fixture(scope="module")
def data():
    return cifar_images(N, 13), np.random.default_rng(6).integers(0, C, N)


@pytest.fixture(scope="module")
def beton(tmp_path_factory, data):
    images, labels = data
    path = tmp_path_factory.mktemp("resident") / "train.beton"
    write_beton(path, lambda i: images[i], labels, num_classes=C, mean=MEAN, std=STD, num_workers=1)
    return path


def in_memory(data, **kw):
    images, labels = data
    return R.ResidentLoader(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, mean=MEAN, std=STD,
                            **{**KW, **kw})


def same_batches(a: list[dict], b: list[dict]) -> bool:
    assert len(a) == len(b)
    return all(torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
               and all(torch.equal(u, v) for u, v in zip(x["views"], y["views"])) for x, y in zip(a, b))


def test_same_batches_as_the_streaming_loader(beton):
    stream = SSLLoader(beton, distributed=False, num_workers=1, **KW)
    resident = R.ssl_loader(beton, distributed=False, num_workers=1, resident="on", **KW)
    assert isinstance(resident, R.ResidentLoader) and len(resident) == len(stream) == N // 32
    for epoch in (0, 1):
        assert same_batches(list(stream.epoch(epoch)), list(resident.epoch(epoch)))
    b = next(iter(resident.epoch(0)))
    assert [v.shape for v in b["views"]] == [(32, 3, 24, 24)] * 3 and b["label"].dtype == b["index"].dtype == torch.int64


def test_identical_seeds_identical_batches(data):
    a, b, other = in_memory(data), in_memory(data), in_memory(data, seed=8)
    assert same_batches(list(a.epoch(2)), list(b.epoch(2)))
    assert not torch.equal(next(iter(a.epoch(2)))["index"], next(iter(other.epoch(2)))["index"])
    assert not torch.equal(next(iter(a.epoch(2)))["index"], next(iter(a.epoch(3)))["index"])
    images, labels = data
    for batch in a.epoch(0):  # labels and pixels follow the index
        assert np.array_equal(batch["label"].numpy(), labels[batch["index"].numpy()])


def test_rank_shards_are_disjoint_and_cover_the_epoch(data):
    ranks = [in_memory(data, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == N // 2 // 32
    seen = [torch.cat([b["index"] for b in loader.epoch(4)]).tolist() for loader in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N))
    v0, v1 = (next(iter(loader.epoch(4)))["views"][0] for loader in ranks)
    assert not torch.equal(v0, v1)  # the rank enters the augmentation seed
    with pytest.raises(DataError, match=r"^rank must be in 0..1, got 2$"):
        in_memory(data, rank=2, world_size=2)


def test_resume_equals_uninterrupted(data):
    loader = in_memory(data)
    full = list(loader.epoch(5))
    assert same_batches(full[3:], list(loader.epoch(5, start_step=3)))
    assert list(loader.epoch(5, start_step=len(loader))) == []
    with pytest.raises(DataError, match=r"^start_step must be in 0..10, got 11$"):
        list(loader.epoch(5, start_step=11))


def test_subset_indices_and_bad_input(data):
    idx = np.arange(0, N, 2)
    loader = in_memory(data, indices=idx)
    seen = torch.cat([b["index"] for b in loader.epoch(0)]).tolist()
    assert len(seen) == len(set(seen)) == len(loader) * 32 and set(seen) <= set(idx.tolist())
    with pytest.raises(DataError, match=r"^index 400 out of range for resident images \(320 samples\)$"):
        in_memory(data, indices=[0, 400])
    with pytest.raises(DataError, match=r"^resident images must be uint8 \[N,3,H,W\], got torch.float32 \(2, 3, 8, 8\)$"):
        R.ResidentLoader(torch.zeros(2, 3, 8, 8), [0, 1], mean=MEAN, std=STD, **KW)
    with pytest.raises(DataError, match=r"^batch_size must be >= 1, got 0$"):
        in_memory(data, batch_size=0)


def test_decoded_copy_is_cached_by_checksum(beton, data, tmp_path, monkeypatch):
    images, labels = data
    got_images, got_labels = R.decode_beton(beton)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    meta = json.loads(lf.meta_path(beton).read_text())
    cached = R.cache_path(beton, meta)
    assert cached.is_file() and cached.name.startswith(f"train.beton.decoded-{meta['sha256'][7:23]}")

    def no_ffcv(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(lf, "read_beton", no_ffcv)
    assert np.array_equal(R.decode_beton(beton)[0], images)  # a hit reads no FFCV
    monkeypatch.undo()
    with open(cached, "r+b") as fh:  # a damaged copy is decoded again from the .beton
        fh.seek(-100, 2)
        fh.write(b"\xff" * 50)
    assert np.array_equal(R.decode_beton(beton)[0], images)
    assert R._load_cached(cached, N) is not None

    other = tmp_path / "train.beton"  # a rewritten .beton: a new key, the old copy removed
    write_beton(other, lambda i: images[i], labels, num_classes=C, mean=MEAN, std=STD)
    R.decode_beton(other)
    first = sorted(p.name for p in tmp_path.glob("train.beton.decoded-*"))
    write_beton(other, lambda i: images[::-1][i], labels[::-1], num_classes=C, mean=MEAN, std=STD)
    assert np.array_equal(R.decode_beton(other)[0], images[::-1])
    second = sorted(p.name for p in tmp_path.glob("train.beton.decoded-*"))
    assert len(first) == len(second) == 2 and not set(first) & set(second)


def test_the_choice(beton):
    stream = R.ssl_loader(beton, distributed=False, num_workers=1, **KW)  # auto on the CPU: streaming
    assert isinstance(stream, SSLLoader)
    assert isinstance(R.ssl_loader(beton, distributed=False, num_workers=1, resident="off", **KW), SSLLoader)
    decoded = N * 32 * 32 * 3
    assert R.decoded_bytes(json.loads(lf.meta_path(beton).read_text())) == decoded
    assert R.use_resident("auto", "cuda", decoded, 1.0) and not R.use_resident("auto", "cuda", decoded, 0.1)
    assert not R.use_resident("auto", "cpu", decoded, 1.0) and not R.use_resident("auto", "cuda", None, 1.0)
    assert R.use_resident("on", "cpu", None, 0.0) and not R.use_resident("off", "cuda", decoded, 1e9)
    with pytest.raises(DataError, match=r"^data.resident must be one of auto, on, off, got 'yes'$"):
        R.ssl_loader(beton, distributed=False, num_workers=1, resident="yes", **KW)
    # data.resident_compile: auto keeps the CPU's numba kernel, on compiles the torch augmentation, off is eager
    pixels = {choice: R.ssl_loader(beton, distributed=False, num_workers=1, resident="on", resident_compile=choice, **KW).pixels
              for choice in ("auto", "on", "off")}
    assert pixels == {"auto": "fused", "on": "compiled", "off": "fused"}


# ----------------------------------------------------------------------------- through train()

DIGITS_YAML = Path(__file__).resolve().parents[1] / "sweeps" / "digits_lt" / "train.yaml"


class _Stop(Exception):
    pass


def _train_cfg(cache_dir, resident):
    return load_config(DIGITS_YAML, {"data.cache_dir": cache_dir, "data.resident": resident, "train.epochs": 2,
                                     "train.eval_every": 0, "eval.linear_epochs": 0, "train.checkpoint_every": 5})


def _model(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.timeout(1800)  # two short digits trainings: seconds on idle cores, minutes on a loaded CI machine
def test_training_with_the_resident_loader_resumes_exactly(tmp_path):
    """train() with data.resident=on, stopped mid-epoch 2 and resumed, ends with the uninterrupted run's weights."""
    from ltssl import train as train_module

    cache = str(tmp_path / "cache")
    uninterrupted = train_module.train(_train_cfg(cache, "on"), tmp_path / "resident")
    assert any(isinstance(loader, R.ResidentLoader) for loader in train_module._LOADERS.values())

    def stop_mid_epoch(info):
        if info["global_step"] == 9:  # epoch 2, step 3 of 7
            assert train_module.checkpoint_now()
            raise _Stop()

    with pytest.raises(_Stop):
        train_module.train(_train_cfg(cache, "on"), tmp_path / "cut", step_hook=stop_mid_epoch)
    resumed = train_module.train(_train_cfg(cache, "on"), tmp_path / "cut")
    a, b = _model(tmp_path / "resident"), _model(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert uninterrupted["final_loss"] == resumed["final_loss"] and uninterrupted["knn_acc"] == resumed["knn_acc"]
