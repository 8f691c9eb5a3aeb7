"""FFCV files and loaders: round trip, K views, reproducible views, resume, DDP shards, bad files, hang guard,
agreement with the torchvision reference."""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ltssl.data.ffcv as lf
from ltssl.data import DataError
from ltssl.data.ffcv import EvalLoader, SSLLoader, meta_path, open_beton, read_beton, write_beton
from ltssl.data.reference import reference_loader
from test_data_util import cifar_images

N, C = 300, 10
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    images = cifar_images(N, 11)
    labels = np.random.default_rng(5).integers(0, C, N)
    return images, labels


@pytest.fixture(scope="module")
def beton(tmp_path_factory, data) -> Path:
    images, labels = data
    path = tmp_path_factory.mktemp("ffcv") / "train.beton"
    write_beton(path, lambda i: images[i], labels, num_classes=C, mean=MEAN, std=STD, num_workers=2)
    return path


@pytest.fixture(scope="module")
def ssl(beton) -> SSLLoader:
    return SSLLoader(beton, batch_size=64, num_views=3, image_size=24, recipe="cifar", seed=7, distributed=False,
                     device=CPU, num_workers=2)


def test_round_trip_is_pixel_exact_and_aligned(beton, data):
    images, labels = data
    got = read_beton(beton)
    assert np.array_equal(got["image"], images)
    assert np.array_equal(got["label"], labels) and np.array_equal(got["index"], np.arange(N))
    meta = json.loads(meta_path(beton).read_text())
    assert meta["num_samples"] == N and meta["image_mode"] == "raw" and meta["sha256"].startswith("sha256:")
    assert meta["class_counts"] == np.bincount(labels, minlength=C).tolist()
    assert not [p for p in beton.parent.iterdir() if p.name.endswith(".tmp")]


def test_k_views_shapes_and_differences(ssl, data):
    images, labels = data
    assert len(ssl) == N // 64
    batches = list(ssl.epoch(0))
    assert len(batches) == len(ssl)
    b = batches[0]
    assert len(b["views"]) == 3
    for v in b["views"]:
        assert v.shape == (64, 3, 24, 24) and v.dtype == torch.float32 and v.device == CPU
    assert not torch.allclose(b["views"][0], b["views"][1]) and not torch.allclose(b["views"][1], b["views"][2])
    # per sample, views differ (independent augmentation), in the normalised range
    diff = (b["views"][0] - b["views"][1]).flatten(1).abs().amax(1)
    assert (diff > 0).all()
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for v in b["views"]:
        assert (v.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (v.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    for batch in batches:  # labels aligned with the sample index
        assert np.array_equal(batch["label"].numpy(), labels[batch["index"].numpy()])
    seen = torch.cat([x["index"] for x in batches])
    assert len(set(seen.tolist())) == len(seen) == len(ssl) * 64  # drop_last: no sample twice


def test_views_reproducible_and_resume_skips_exactly(ssl):
    first = list(ssl.epoch(0))
    again = list(ssl.epoch(0))
    for a, b in zip(first, again):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"]):
            assert torch.equal(va, vb)
    resumed = list(ssl.epoch(0, start_step=2))
    assert len(resumed) == len(first) - 2
    for a, b in zip(first[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        for va, vb in zip(a["views"], b["views"]):
            assert torch.equal(va, vb)
    other = next(iter(ssl.epoch(1)))
    assert not torch.equal(other["index"], first[0]["index"])
    assert list(ssl.epoch(0, start_step=len(ssl))) == []
    with pytest.raises(DataError, match=r"^start_step must be in 0..4, got 5$"):
        list(ssl.epoch(0, start_step=5))


def test_same_seed_new_loader_same_views(beton, ssl):
    twin = SSLLoader(beton, batch_size=64, num_views=3, image_size=24, recipe="cifar", seed=7, distributed=False,
                     device=CPU, num_workers=1)
    a, b = next(iter(ssl.epoch(3))), next(iter(twin.epoch(3)))
    assert torch.equal(a["index"], b["index"]) and all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))


def test_eval_loader_plain_images_in_file_order(beton, data):
    images, labels = data
    ev = EvalLoader(beton, batch_size=128, device=CPU, num_workers=2)
    out = list(ev)
    assert [len(x["label"]) for x in out] == [128, 128, 44]
    x = torch.cat([o["image"] for o in out])
    expect = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-5)
    assert torch.cat([o["index"] for o in out]).tolist() == list(range(N))
    assert torch.cat([o["label"] for o in out]).numpy().tolist() == labels.tolist()


def test_imagenet_recipe_and_subset_indices(beton, data):
    _, labels = data
    idx = np.arange(0, N, 3)
    ld = SSLLoader(beton, batch_size=32, num_views=2, image_size=32, recipe="imagenet", seed=0, distributed=False,
                   device=CPU, num_workers=1, indices=idx)
    seen = torch.cat([b["index"] for b in ld.epoch(0)])
    assert set(seen.tolist()) <= set(idx.tolist()) and len(seen) == (len(idx) // 32) * 32
    with pytest.raises(DataError, match=rf"^index {N} out of range for .*train.beton \({N} samples\)$"):
        SSLLoader(beton, batch_size=32, num_views=2, image_size=32, recipe="cifar", seed=0, distributed=False, device=CPU,
                  num_workers=1, indices=[0, N])
    with pytest.raises(DataError, match=r"^index -1 out of range"):
        EvalLoader(beton, batch_size=32, device=CPU, num_workers=1, indices=[-1, 2])
    with pytest.raises(DataError, match=r"^augmentation recipe must be one of cifar, imagenet, got 'svhn'$"):
        SSLLoader(beton, batch_size=32, num_views=2, image_size=32, recipe="svhn", seed=0, distributed=False, device=CPU,
                  num_workers=1)


# ----------------------------------------------------------------------------- bad files


def _copy(beton: Path, dst: Path) -> Path:
    dst.write_bytes(beton.read_bytes())
    meta_path(dst).write_text(meta_path(beton).read_text())
    return dst


def test_corrupt_and_truncated_betons(beton, tmp_path):
    bad = _copy(beton, tmp_path / "flip.beton")
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the image data: FFCV itself would not notice
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"^.*flip.beton is corrupt: sha256 \w+\.\.\. differs from its sidecar's \w+\.\.\.$"):
        open_beton(bad)
    cut = _copy(beton, tmp_path / "cut.beton")
    size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[: size // 3])
    with pytest.raises(DataError, match=rf"^.*cut.beton is truncated or corrupt: {size // 3} bytes, expected {size}$"):
        SSLLoader(cut, batch_size=8, num_views=2, image_size=32, recipe="cifar", seed=0, distributed=False, device=CPU,
                  num_workers=1)
    orphan = tmp_path / "orphan.beton"
    orphan.write_bytes(beton.read_bytes())
    with pytest.raises(DataError, match=r"orphan.beton has no orphan.beton.json: it was not written by .* or its write did not finish$"):
        EvalLoader(orphan, batch_size=8, device=CPU, num_workers=1)
    with pytest.raises(DataError, match=r"^.*missing.beton does not exist$"):
        EvalLoader(tmp_path / "missing.beton", batch_size=8, device=CPU, num_workers=1)


def test_write_rejects_bad_labels_and_leaves_nothing(tmp_path, data):
    images, labels = data
    bad = labels.copy()
    bad[3] = C
    with pytest.raises(DataError, match=rf"^cannot write .*x.beton: label {C} out of range 0..{C - 1}$"):
        write_beton(tmp_path / "x.beton", lambda i: images[i], bad, num_classes=C, mean=MEAN, std=STD)
    assert list(tmp_path.iterdir()) == []


def test_writer_failure_is_an_error_not_a_hang(tmp_path, data):
    images, labels = data

    def get(i):
        if i == 150:
            os._exit(3)  # a worker dies (e.g. killed for memory)
        return images[i]

    with pytest.raises(DataError, match=r"^writing .*\.tmp failed: a writer process exited with code 3$"):
        write_beton(tmp_path / "y.beton", get, labels, num_classes=C, mean=MEAN, std=STD)
    assert list(tmp_path.iterdir()) == []

    def unreadable(i):
        if i == 77:
            raise DataError("cannot read image /data/x/77.jpg: truncated")
        return images[i]

    with pytest.raises(DataError, match=r"^writing .*\.tmp failed: cannot read image /data/x/77.jpg: truncated$"):
        write_beton(tmp_path / "z.beton", unreadable, labels, num_classes=C, mean=MEAN, std=STD, num_workers=2)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_error_and_stall_end_with_a_one_line_error(beton, monkeypatch):
    # Deferred: importing ffcv at collection would set torch's thread count to 1 for every test module.
    from ffcv.fields.basics import IntDecoder
    from ffcv.pipeline.operation import Operation
    from ffcv.transforms import ToTensor

    class Boom(Operation):
        def __init__(self, sleep_s: float = 0.0):
            super().__init__()
            self.sleep_s = sleep_s

        def generate_code(self):
            sleep_s = self.sleep_s

            def boom(inp, dst):
                if sleep_s:
                    time.sleep(sleep_s)
                    return inp
                raise RuntimeError("boom in a transform")

            return boom

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False), None

    monkeypatch.setattr(lf, "_int_pipeline", lambda: [IntDecoder(), ToTensor(), Boom()])
    ev = EvalLoader(beton, batch_size=64, device=CPU, num_workers=1)
    with pytest.raises(DataError, match=r"^loading .*train.beton failed in the FFCV pipeline: RuntimeError: boom in a transform$"):
        list(ev)
    monkeypatch.setattr(lf, "_int_pipeline", lambda: [IntDecoder(), ToTensor(), Boom(sleep_s=3.0)])
    ev = EvalLoader(beton, batch_size=64, device=CPU, num_workers=1, fetch_timeout_s=0.5)
    # the error itself says the wait gave up at 0.5 s: a batch that came after the 3 s sleep would not raise
    with pytest.raises(DataError, match=r"^loading .*train.beton: no batch within 0.5 s \(FFCV loader stalled\)$"):
        list(ev)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init_file: str, beton: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ssl = SSLLoader(beton, batch_size=32, num_views=2, image_size=32, recipe="cifar", seed=3, distributed=True,
                        device=torch.device("cpu"), num_workers=1)
        batches = list(ssl.epoch(0))
        ev = EvalLoader(beton, batch_size=64, device=torch.device("cpu"), num_workers=1, distributed=True)
        eval_idx = torch.cat([b["index"] for b in ev]).tolist()
        first_view = batches[0]["views"][0][0].flatten()[:16].tolist()
        result = {"len": len(ssl), "ssl": torch.cat([b["index"] for b in batches]).tolist(), "eval": eval_idx,
                  "view": first_view, "epoch1": next(iter(ssl.epoch(1)))["index"].tolist()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_get_disjoint_shards(beton, tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(beton), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["len"] == r1["len"] == (N // 2) // 32
    assert len(r0["ssl"]) == len(r1["ssl"]) == r0["len"] * 32
    assert not set(r0["ssl"]) & set(r1["ssl"])
    assert set(r0["eval"]) | set(r1["eval"]) == set(range(N)) and not set(r0["eval"]) & set(r1["eval"])
    assert r0["view"] != r1["view"]
    assert r0["epoch1"] != r0["ssl"][:32]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_loaders_leave_numbas_shared_types_alone(beton, data, tmp_path):
    """FFCV 1.0.2 turned numba's shared array(uint8, 1d, C) type read-only in place, so collected
    decoders printed a KeyError from numba's finalizer (see ltssl.data.ffcv._os_cache_compile_reader)."""
    import numba  # deferred like ffcv: numba is only needed where FFCV is

    images, labels = data
    jpeg = tmp_path / "jpeg.beton"
    write_beton(jpeg, lambda i: images[i], labels, num_classes=C, mean=MEAN, std=STD, max_resolution=32)
    shared = numba.uint8[::1]
    for path in (beton, jpeg):
        ev = EvalLoader(path, batch_size=100, device=CPU, num_workers=1, image_size=32)
        assert sum(len(b["index"]) for b in ev) == N
        del ev
        gc.collect()  # the loaders' compiled functions are released here: no KeyError, no warning
    assert numba.uint8[::1] is shared and shared.mutable and shared.key == (numba.uint8, 1, "C", True, True)


def test_distributed_without_process_group(beton):
    with pytest.raises(DataError, match=r"^distributed=True needs the torch.distributed process group initialised before the loader is built$"):
        SSLLoader(beton, batch_size=8, num_views=2, image_size=32, recipe="cifar", seed=0, distributed=True, device=CPU,
                  num_workers=1)


# ----------------------------------------------------------------------------- reference pipeline


def test_reference_and_ffcv_views_agree(ssl, data):
    images, labels = data
    ref = reference_loader(images, labels, batch_size=64, num_views=3, image_size=24, recipe="cifar", mean=MEAN, std=STD,
                           seed=0, num_workers=0)
    ref_batches = list(ref)
    ffcv_batches = list(ssl.epoch(0))
    assert len(ref_batches) == len(ffcv_batches) == len(ssl)
    for rb, fb in zip(ref_batches, ffcv_batches):
        assert rb.keys() == fb.keys()
        assert [v.shape for v in rb["views"]] == [v.shape for v in fb["views"]]
        assert [v.dtype for v in rb["views"]] == [v.dtype for v in fb["views"]]
        assert rb["label"].dtype == fb["label"].dtype == torch.int64
        assert np.array_equal(rb["label"].numpy(), labels[rb["index"].numpy()])
        assert np.array_equal(fb["label"].numpy(), labels[fb["index"].numpy()])
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)

    def stats(batches):
        x = torch.cat([v for b in batches for v in b["views"]])
        assert (x.amin(dim=(0, 2, 3)) >= lo - 1e-4).all() and (x.amax(dim=(0, 2, 3)) <= hi + 1e-4).all()
        gray_frac = ((x[:, 0] - x[:, 1]).abs().flatten(1).amax(1) * STD[0] < 0.02).float().mean()
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)), gray_frac

    (m_ref, s_ref, g_ref), (m_ffcv, s_ffcv, g_ffcv) = stats(ref_batches), stats(ffcv_batches)
    assert torch.allclose(m_ref, m_ffcv, atol=0.1), (m_ref, m_ffcv)
    assert torch.allclose(s_ref, s_ffcv, rtol=0.15), (s_ref, s_ffcv)
    assert abs(float(g_ref) - float(g_ffcv)) < 0.1  # grayscale p 0.2 (+ saturation-0 jitter) in both
