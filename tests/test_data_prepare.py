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
    from ltssl.data.ffcv import EvalLoader, SSLLoader

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
