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


# ----------------------------------------------------------------------------- TASE in the contrastive losses

from ltssl.config import ConfigError  # noqa: E402
from ltssl.methods import METHODS, build_method, method_class  # noqa: E402
from ltssl.methods.base import info_nce, nt_xent  # noqa: E402


def _cfg(name, **over):
    base = {"method.name": name, "model.backbone": "small_cnn", "model.norm": "group", "data.image_size": 16,
            "method.proj_dim": 16, "method.proj_hidden_dim": 16, "method.moco_queue_size": 32,
            "method.temperature": 0.2, "method.tase.enabled": True, "method.tase.num_clusters": 2,
            "method.tase.tau_min": 0.1, "method.tase.tau_max": 0.5}
    base.update(over)
    return load_config(overrides=base)


def _batch(b=6, n_train=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
    return views, {"label": torch.zeros(b, dtype=torch.long), "index": torch.randperm(n_train, generator=g)[:b]}


@pytest.mark.parametrize("name", ["simclr", "moco_v2"])
def test_tase_temperatures_and_weights_reach_the_contrastive_loss(name):
    torch.manual_seed(0)
    method = build_method(_cfg(name), num_classes=2)
    assert isinstance(method, METHODS[name]) and type(method).__name__.endswith("TASE")
    views, batch = _batch()

    def loss_with(tau, weight):
        if name == "simclr":
            z = [method.embed(v)["z"] for v in views]
            return nt_xent(z[0], z[1], tau) * weight
        ks = method._keys
        q = [method._query(v) for v in views]
        queue = method.queue.clone()
        return 0.5 * (info_nce(q[0], ks[1], queue, tau) + info_nce(q[1], ks[0], queue, tau)) * weight

    # before any clustering: the global temperature, weight 1
    assert method.wants_train_features(0)
    first = method(views, batch)
    if name == "moco_v2":
        first = method(views, batch, update_state=False)
    assert torch.allclose(first, loss_with(0.2, 1.0), atol=1e-6)

    # hand-made training features: 16 samples in one cluster, 4 in another
    feats, groups = _blobs([16, 4], dim=8)
    method.on_train_features(feats, groups, epoch=0)
    assert not method.wants_train_features(0)
    labels = method.tase.current.pseudo_labels
    assert _same_partition(labels, groups)
    size = torch.bincount(groups)[groups].double()
    tau_i = (0.1 + 0.4 * (size / 16).sqrt()).float()[batch["index"]]
    w_i = (size.pow(-0.5) * 20 / (16 * 16 ** -0.5 + 4 * 4 ** -0.5)).float()[batch["index"]]
    assert torch.allclose(method.sample_temperature(batch), tau_i) and torch.allclose(method.sample_weight(batch), w_i)
    loss = method(views, batch)
    if name == "moco_v2":
        loss = method(views, batch, update_state=False)
    assert torch.allclose(loss, loss_with(tau_i, w_i), atol=1e-5)
    assert not torch.allclose(loss, loss_with(0.2, 1.0), atol=1e-3)


def test_nt_xent_row_uses_its_own_sample_temperature():
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    tau = torch.tensor([0.1, 0.2, 0.3, 0.5])
    a, b = torch.nn.functional.normalize(za, dim=1), torch.nn.functional.normalize(zb, dim=1)

    def row(anchor, same, other, i):
        logits = torch.cat([anchor[i] @ other.T, torch.cat([anchor[i] @ same[:i].T, anchor[i] @ same[i + 1:].T])]) / tau[i]
        return -(logits[i] - torch.logsumexp(logits, 0))

    expected = torch.stack([0.5 * (row(a, a, b, i) + row(b, b, a, i)) for i in range(4)])
    assert torch.allclose(nt_xent(za, zb, tau), expected, atol=1e-5)


def test_tase_assignment_survives_a_checkpoint(tmp_path):
    cfg = _cfg("simclr")
    torch.manual_seed(0)
    method = build_method(cfg, num_classes=2)
    feats, groups = _blobs([16, 4], dim=8)
    method.on_train_features(feats, groups, epoch=0)
    torch.save(method.state_dict(), tmp_path / "m.pt")
    fresh = build_method(cfg, num_classes=2)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    index = torch.arange(20)
    assert torch.equal(fresh.tase.temperatures(index), method.tase.temperatures(index))
    assert not fresh.wants_train_features(0) and fresh.wants_train_features(1)


def test_tase_needs_a_contrastive_method():
    with pytest.raises(ConfigError, match="method.tase.enabled needs a contrastive method.name"):
        method_class(_cfg("simsiam"))
    assert method_class(_cfg("simclr", **{"method.tase.enabled": False})) is METHODS["simclr"]
