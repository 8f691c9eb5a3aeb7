"""prepare_dataset on digits: cached, atomic, and the loaders on its files."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from ltssl.config import load_config
from ltssl.data import DataError, PreparedDataset, prepare_dataset
from ltssl.data.ffcv import EvalLoader, SSLLoader
from ltssl.data.prepare import dataset_dir_name
from test_data_util import write_cifar, write_image_folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> PreparedDataset:
    cfg = load_config(overrides={"data.cache_dir": str(tmp_path_factory.mktemp("cache")), "data.imbalance_ratio": 10})
    return prepare_dataset(cfg.data)


def test_digits_prepared_fields(digits):
    assert digits.num_classes == 10
    assert digits.class_counts == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]
    assert digits.n_train == sum(digits.class_counts) == 503
    assert digits.groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert digits.image_size == 32 and digits.ood is None
    for f in (digits.train_beton, digits.test_beton, digits.probe_beton):
        assert f.is_file() and f.is_absolute()
    m = digits.manifest
    assert m["test"]["counts"] == [50] * 10
    assert m["probe"]["counts"] == [124] * 10
    assert m["balanced"]["n"] == m["longtail"]["n"] == 503
    assert m["files"]["train"]["sha256"].startswith("sha256:")
    assert json.loads((digits.root / "manifest.json").read_text())["complete"] is True


def test_cached_call_is_fast_and_identical(digits):
    cfg = load_config(overrides={"data.cache_dir": str(digits.root.parent), "data.imbalance_ratio": 10})
    t0 = time.perf_counter()
    again = prepare_dataset(cfg.data)
    assert time.perf_counter() - t0 < 0.5
    assert again.root == digits.root and again.manifest == digits.manifest


def test_ssl_and_eval_loaders_on_digits(digits):
    loader = SSLLoader(digits.train_beton, batch_size=64, num_views=2, image_size=32, recipe="cifar", seed=0,
                       distributed=False, device=torch.device("cpu"), num_workers=2)
    assert len(loader) == 503 // 64
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader)
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen)
    b = batches[0]
    assert [v.shape for v in b["views"]] == [torch.Size([64, 3, 32, 32])] * 2
    assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
    ev = EvalLoader(digits.test_beton, batch_size=200, device=torch.device("cpu"), num_workers=2)
    labels = torch.cat([x["label"] for x in ev])
    assert labels.tolist() == sorted(labels.tolist()) or len(labels) == 500
    assert np.bincount(labels.numpy()).tolist() == [50] * 10


def test_bad_ratio_is_one_line_error(tmp_path):
    cfg = load_config(overrides={"data.cache_dir": str(tmp_path)})
    bad = dataclasses.replace(cfg.data, imbalance_ratio=0.5)
    with pytest.raises(DataError, match=r"^data.imbalance_ratio must be >= 1, got 0.5$"):
        prepare_dataset(bad)
    assert not any(tmp_path.iterdir())


def test_imagefolder_jpeg_path_end_to_end(tmp_path):
    root = write_image_folder(tmp_path / "img", [12, 12, 12], test_per_class=2, size=(40, 52))
    cfg = load_config(overrides={"data.dataset": "imagefolder", "data.root": str(root), "data.imbalance_ratio": 4,
                                 "data.image_size": 24, "data.cache_dir": str(tmp_path / "cache")})
    ds = prepare_dataset(cfg.data)
    assert ds.class_counts == [12, 6, 3] and ds.groups == {"many": [], "medium": [], "few": [0, 1, 2]}
    assert ds.manifest["files"]["train"]["image_mode"] == "jpg" and ds.manifest["files"]["train"]["decode_size"] == 27
    ssl = SSLLoader(ds.train_beton, batch_size=8, num_views=2, image_size=24, recipe="imagenet", seed=0, distributed=False,
                    device=torch.device("cpu"), num_workers=1)
    b = next(iter(ssl.epoch(0)))
    assert [v.shape for v in b["views"]] == [torch.Size([8, 3, 24, 24])] * 2
    ev = EvalLoader(ds.test_beton, batch_size=4, device=torch.device("cpu"), num_workers=1)
    x = torch.cat([e["image"] for e in ev])
    assert x.shape == (6, 3, 24, 24)


def test_semi_synthetic_views_and_ood(tmp_path):
    c10 = write_cifar(tmp_path / "c10", "cifar10", per_class_train=20, per_class_test=2)
    c100 = write_cifar(tmp_path / "c100", "cifar100", per_class_train=3, per_class_test=1)
    cfg = load_config(overrides={"data.dataset": "cifar10", "data.root": str(c10), "data.semi_synthetic": True,
                                 "data.ood_dataset": "cifar100", "data.ood_root": str(c100),
                                 "data.cache_dir": str(tmp_path / "cache")})
    ds = prepare_dataset(cfg.data)
    assert ds.manifest["files"]["train"]["image_shape"] == [32, 64]
    ssl = SSLLoader(ds.train_beton, batch_size=16, num_views=2, image_size=32, recipe="cifar", seed=0, distributed=False,
                    device=torch.device("cpu"), num_workers=1)
    assert next(iter(ssl.epoch(0)))["views"][0].shape == (16, 3, 32, 32)
    ev = EvalLoader(ds.test_beton, batch_size=64, device=torch.device("cpu"), num_workers=1)
    assert next(iter(ev))["image"].shape == (20, 3, 32, 32)
    ood = ds.ood
    assert ood is not None and ood.num_classes == 100 and ood.class_counts == [3] * 100
    assert ood.probe_beton.stat().st_ino == ood.train_beton.stat().st_ino  # one file, hard-linked
    assert ood.manifest["test"]["n"] == 100


def test_interrupted_build_is_rebuilt(tmp_path):
    cfg = load_config(overrides={"data.cache_dir": str(tmp_path), "data.imbalance_ratio": 2})
    half = tmp_path / dataset_dir_name(cfg.data)
    half.mkdir()
    (half / "manifest.json").write_text('{"format": "ltssl-longtail-1"}')  # a crash left this
    ds = prepare_dataset(cfg.data)
    assert ds.root == half and ds.manifest["complete"] and ds.train_beton.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [half.name]
