"""kNN, linear probe, per-class and many/medium/few accuracy, feature extraction order."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltssl.config import load_config
from ltssl.eval import (accuracy, extract_features, group_accuracy, knn_predict, linear_probe, linear_report,
                        per_class_accuracy)


def _blobs(per_class, num_classes=4, dim=8, spread=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_classes]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return F.normalize(x, dim=1), labels


def test_knn_recovers_clusters_and_weights_votes_by_similarity():
    bank, bank_labels = _blobs(20)
    test, test_labels = _blobs(10, seed=1)
    preds = knn_predict(bank, bank_labels, test, 4, k=5, temperature=0.1, chunk=7)
    assert accuracy(preds, test_labels) == 1.0
    # by hand: 2 far neighbours of class 1 outvote... no: 1 very close neighbour of class 0 outweighs 2 weak ones of class 1
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    query = F.normalize(torch.tensor([[1.0, 0.3]]), dim=1)
    assert knn_predict(bank, torch.tensor([0, 1, 1]), query, 2, k=3, temperature=0.05).item() == 0
    assert knn_predict(bank, torch.tensor([0, 1, 1]), query, 2, k=3, temperature=100.0).item() == 1  # ~ majority vote
    assert knn_predict(bank, torch.tensor([0, 1, 1]), query, 2, k=50).shape == (1,)  # k > bank size


def test_linear_probe_separates_linearly_separable_features():
    train_x, train_y = _blobs(50, spread=0.3)
    test_x, test_y = _blobs(20, spread=0.3, seed=1)
    preds = linear_probe(train_x, train_y, test_x, 4, epochs=20, lr=0.1, batch_size=32, seed=0)
    assert accuracy(preds, test_y) >= 0.95
    again = linear_probe(train_x, train_y, test_x, 4, epochs=20, lr=0.1, batch_size=32, seed=0)
    assert torch.equal(preds, again)  # deterministic


def test_linear_probe_beats_chance_only_with_signal():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=gen), torch.randint(0, 4, (200,), generator=gen)
    xt, yt = torch.randn(200, 8, generator=gen), torch.randint(0, 4, (200,), generator=gen)
    assert accuracy(linear_probe(x, y, xt, 4, epochs=10), yt) < 0.45


def test_per_class_and_many_medium_few_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    preds = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0, 4, 4])
    assert per_class_accuracy(preds, labels, 6) == [1.0, 0.5, 0.5, 0.0, 1.0, None]
    groups = {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert group_accuracy(preds, labels, groups) == {"acc_many": 0.75, "acc_medium": 0.25, "acc_few": 1.0}
    assert group_accuracy(preds, labels, {"few": [5]}) == {"acc_few": None}
    assert accuracy(preds, labels) == pytest.approx(0.6)


def test_linear_report_keys():
    train_x, train_y = _blobs(30)
    test_x, test_y = _blobs(10, seed=1)
    cfg = load_config({"eval": {"linear_epochs": 5}}).eval
    out = linear_report((train_x, train_y), (test_x, test_y), 4, cfg, {"many": [0, 1], "medium": [2], "few": [3]})
    assert set(out) == {"linear_acc", "per_class_acc", "acc_many", "acc_medium", "acc_few"}
    assert len(out["per_class_acc"]) == 4 and 0.0 <= out["linear_acc"] <= 1.0


class _Recorder(nn.Module):
    """An 'encoder' whose feature is a function of the image, with a BatchNorm to check eval mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.bn(x.mean(dim=(2, 3)))


def test_extract_features_orders_rows_by_sample_index_in_eval_mode():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 4, 4, generator=gen)
    labels = torch.arange(10) % 3
    order = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 4, 6, 3])  # shuffled, with one sample served twice (sampler padding)
    batches = [{"image": images[order[i:i + 4]], "label": labels[order[i:i + 4]], "index": order[i:i + 4]}
               for i in range(0, len(order), 4)]
    enc = _Recorder()
    feats, got_labels = extract_features(enc, batches, "cpu")
    assert enc.modes == [False] * 3 and enc.training  # eval mode during extraction, restored after
    assert torch.equal(got_labels, labels)
    assert torch.allclose(feats, F.normalize(enc.eval()(images), dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="never served"):
        extract_features(enc, batches[:1], "cpu")
