"""TASE: k-means pseudo-labels, the per-sample temperature and weight rules, and their use in the loss."""

from __future__ import annotations

import math

import pytest
import torch

from ltssl.config import load_config
from ltssl.methods.tase import TaseState, cluster_temperatures, cluster_weights, kmeans


def _blobs(sizes, dim=8, spread=0.05, seed=0):
    """Unit-norm points around len(sizes) orthogonal directions; returns (features [N, D], group [N])."""
    g = torch.Generator().manual_seed(seed)
    feats, groups = [], []
    for c, n in enumerate(sizes):
        centre = torch.zeros(dim)
        centre[c] = 1.0
        feats.append(centre + spread * torch.randn(n, dim, generator=g))
        groups += [c] * n
    x = torch.nn.functional.normalize(torch.cat(feats), dim=1)
    perm = torch.randperm(len(groups), generator=g)
    return x[perm], torch.tensor(groups)[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_temperature_rule_on_hand_made_cluster_sizes():
    sizes = torch.tensor([100, 25, 4, 0])
    tau = cluster_temperatures(sizes, tau_min=0.1, tau_max=0.5, temperature_power=0.5)
    # tau_c = 0.1 + 0.4 * sqrt(n_c / 100)
    assert torch.allclose(tau, torch.tensor([0.5, 0.3, 0.18, 0.1]))
    # the largest cluster gets tau_max, smaller clusters lower, always within [tau_min, tau_max]
    assert tau[0] == pytest.approx(0.5) and bool((tau[:-1].diff() < 0).all())
    linear = cluster_temperatures(sizes, 0.2, 0.4, temperature_power=1.0)
    assert torch.allclose(linear, torch.tensor([0.4, 0.25, 0.208, 0.2]))
    balanced = cluster_temperatures(torch.tensor([7, 7, 7]), 0.1, 0.5)
    assert torch.allclose(balanced, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="tau_min"):
        cluster_temperatures(sizes, 0.6, 0.5)


def test_weight_rule_on_hand_made_cluster_sizes():
    sizes = torch.tensor([100, 25, 4])
    w = cluster_weights(sizes, weight_power=0.5)
    # w_c = n_c^-0.5 * N / sum n_c^0.5 = [0.1, 0.2, 0.5] * 129 / 17
    assert torch.allclose(w, torch.tensor([0.1, 0.2, 0.5]) * 129 / 17)
    per_sample = w.repeat_interleave(sizes)
    assert per_sample.mean().item() == pytest.approx(1.0)
    # inverse-frequency (p = 1): every cluster carries the same total weight
    w1 = cluster_weights(sizes, weight_power=1.0)
    assert torch.allclose(w1 * sizes, torch.full((3,), 129 / 3))
    assert torch.allclose(cluster_weights(sizes, 0.0), torch.ones(3))
    assert cluster_weights(torch.tensor([5, 0, 5]), 0.5)[1] == 0


def test_kmeans_recovers_hand_made_clusters_deterministically():
    x, groups = _blobs([40, 12, 3])
    labels, centroids = kmeans(x, 3, seed=0)
    assert _same_partition(labels, groups)
    assert sorted(torch.bincount(labels).tolist()) == [3, 12, 40]
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3))
    again, _ = kmeans(x, 3, seed=0)
    assert torch.equal(labels, again)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 100)


def test_kmeans_never_leaves_a_cluster_empty():
    x, _ = _blobs([20, 20])
    labels, _ = kmeans(x, 5, seed=3)
    assert (torch.bincount(labels, minlength=5) > 0).all()


def test_state_gives_per_sample_temperature_and_weight_by_index():
    cfg = load_config(overrides={"method.tase.enabled": True, "method.tase.num_clusters": 3,
                                 "method.tase.tau_min": 0.1, "method.tase.tau_max": 0.5,
                                 "method.tase.refresh_every": 2}).method.tase
    x, groups = _blobs([40, 12, 3])
    state = TaseState(cfg, seed=0)
    index = torch.arange(len(groups))
    assert state.temperatures(index) is None and state.weights(index) is None
    assert state.update(x, epoch=0)
    tau, w = state.temperatures(index), state.weights(index)
    size_of = torch.bincount(groups)[groups].double()
    expected_tau = 0.1 + 0.4 * (size_of / 40).sqrt()
    assert torch.allclose(tau.double(), expected_tau, atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    # tail samples: lowest temperature, highest weight
    tail = groups == 2
    assert tau[tail].max() < tau[~tail].min() and w[tail].min() > w[~tail].max()
    # lookup by the sample index of a batch
    batch_index = torch.tensor([5, 0, 17])
    assert torch.equal(state.temperatures(batch_index), tau[batch_index])
    # refresh every 2 epochs
    assert not state.update(x, epoch=1)
    assert state.update(x, epoch=2)
    restored = TaseState(cfg, seed=0)
    restored.load_state_dict(state.state_dict())
    assert torch.equal(restored.weights(index), state.weights(index))


def test_state_respects_enabled_and_start_epoch():
    x, _ = _blobs([10, 10])
    off = TaseState(load_config().method.tase)
    assert not off.update(x, epoch=0) and off.temperatures(torch.arange(3)) is None
    late = TaseState(load_config(overrides={"method.tase.enabled": True, "method.tase.num_clusters": 2,
                                            "method.tase.start_epoch": 2}).method.tase)
    assert not late.update(x, epoch=1)
    assert late.update(x, epoch=2)
    assert math.isclose(float(late.weights(torch.arange(20)).mean()), 1.0, rel_tol=1e-6)
