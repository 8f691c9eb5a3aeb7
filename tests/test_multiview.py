"""Multi-view SSL: the extreme-feature filter, the view pairing, and K-view losses of the methods."""

from __future__ import annotations

import pytest
import torch

from ltssl.config import ConfigError, load_config
from ltssl.methods import METHODS, build_method
from ltssl.methods.base import view_pairs
from ltssl.methods.multiview import extreme_feature_mask, extreme_statistic, filter_views, with_feature_filter


def test_filter_masks_exactly_the_dimensions_with_the_largest_spread():
    # K = 3 views, B = 2 samples, D = 5 dims; spreads chosen by hand
    z = torch.zeros(3, 2, 5)
    z[:, 0] = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0],
                            [1.0, 0.2, -3.0, 0.1, 0.0],
                            [0.5, 0.0, 0.0, 0.0, 2.0]])   # spreads 1.0, 0.2, 3.0, 0.1, 2.0
    z[:, 1] = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.3, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.4, 0.0]])   # spreads 0.0, 5.0, 0.3, 0.4, 0.0
    assert torch.allclose(extreme_statistic(z, "spread"),
                          torch.tensor([[1.0, 0.2, 3.0, 0.1, 2.0], [0.0, 5.0, 0.3, 0.4, 0.0]]))
    keep = extreme_feature_mask(z, quantile=0.4)   # floor(0.4 * 5) = 2 dims dropped per sample
    assert keep.tolist() == [[True, True, False, True, False], [True, False, True, False, True]]
    keep1 = extreme_feature_mask(z, quantile=0.2)  # 1 dim dropped
    assert keep1.tolist() == [[True, True, False, True, True], [True, False, True, True, True]]
    assert extreme_feature_mask(z, quantile=0.0).all()
    assert extreme_feature_mask(z, quantile=0.19).all()   # floor(0.95) = 0
    with pytest.raises(ValueError, match="filter_quantile"):
        extreme_feature_mask(z, quantile=1.0)


def test_filter_ties_drop_the_lower_index_first():
    z = torch.zeros(2, 1, 4)
    z[1, 0] = torch.tensor([1.0, 2.0, 2.0, 1.0])
    assert extreme_feature_mask(z, 0.25).tolist() == [[True, False, True, True]]
    assert extreme_feature_mask(z, 0.75).tolist() == [[False, False, False, True]]


def test_zscore_statistic_flags_the_outlying_value():
    g = torch.Generator().manual_seed(0)
    z = 0.1 * torch.randn(3, 16, 6, generator=g)
    z[2, 4, 3] = 10.0    # one extreme value: view 2, sample 4, dim 3
    keep = extreme_feature_mask(z, quantile=1 / 6, statistic="zscore")
    assert keep[4].tolist() == [True, True, True, False, True, True]
    assert (~keep).sum(dim=1).eq(1).all()
    with pytest.raises(ValueError, match="filter_statistic"):
        extreme_statistic(z, "bogus")


def test_filter_views_zeroes_masked_dims_in_every_view_and_blocks_their_gradient():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 10, generator=g, requires_grad=True)
    p = torch.randn(3, 4, 10, generator=g, requires_grad=True)
    outs = [{"z": z[k], "p": p[k], "other": torch.ones(4, 3)} for k in range(3)]
    filtered = filter_views(outs, quantile=0.3)
    keep = extreme_feature_mask(z.detach(), 0.3)
    assert (~keep).sum(dim=1).eq(3).all()
    for k in range(3):
        assert torch.equal(filtered[k]["z"], z[k] * keep)
        assert torch.equal(filtered[k]["p"], p[k] * keep)
        assert filtered[k]["other"] is outs[k]["other"]
    sum(f["z"].sum() + f["p"].sum() for f in filtered).backward()
    assert torch.equal(z.grad[0], keep.float()) and torch.equal(p.grad[2], keep.float())
    assert filter_views(outs, quantile=0.0) is outs


def test_view_pairs():
    assert view_pairs(2, "all_pairs") == [(0, 1)] == view_pairs(2, "anchor")
    assert view_pairs(4, "all_pairs") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert view_pairs(4, "anchor") == [(0, 1), (0, 2), (0, 3)]


# ----------------------------------------------------------------------------- K views through the methods

SSL = ["simsiam", "simclr", "moco_v2"]


def _cfg(name, **over):
    base = {"method.name": name, "model.backbone": "small_cnn", "model.norm": "group", "data.image_size": 16,
            "method.proj_dim": 32, "method.proj_hidden_dim": 32, "method.pred_hidden_dim": 8,
            "method.moco_queue_size": 64, "train.seed": 0}
    base.update(over)
    return load_config(overrides=base)


def _views(k, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(k)], {"label": torch.arange(b) % 3, "index": torch.arange(b)}


def _method(cfg):
    torch.manual_seed(0)
    return build_method(cfg, num_classes=3)


def _outs(method, views):
    """The per-view outputs forward() pairs (MoCo: after forward() set its keys for these views)."""
    if hasattr(method, "_keys"):
        return [{"q": method._query(v), "k": k} for v, k in zip(views, method._keys)]
    return [method.embed(v) for v in views]


@pytest.mark.parametrize("name", SSL)
def test_k2_multiview_loss_equals_the_two_view_loss(name):
    method = _method(_cfg(name, **{"data.num_views": 2}))
    views, batch = _views(2)
    first = method(views, batch)                       # MoCo: momentum update + keys of these views
    loss = method(views, batch, update_state=False) if name == "moco_v2" else first
    outs = _outs(method, views)
    two_view = method.pair_loss(outs[0], outs[1], batch)
    assert loss.shape == (6,)
    assert torch.allclose(loss, two_view, atol=1e-6)
    # anchor pairing is the same single pair for K = 2
    anchored = _method(_cfg(name, **{"method.multiview.pairing": "anchor"}))
    a = anchored(views, batch)
    if name == "moco_v2":
        a = anchored(views, batch, update_state=False)
    assert torch.allclose(a, loss, atol=1e-6)


@pytest.mark.parametrize("name", SSL)
@pytest.mark.parametrize("pairing", ["all_pairs", "anchor"])
def test_k4_loss_is_the_mean_of_the_pair_losses(name, pairing):
    method = _method(_cfg(name, **{"data.num_views": 4, "method.multiview.pairing": pairing}))
    views, batch = _views(4)
    loss = method(views, batch)
    if name == "moco_v2":
        loss = method(views, batch, update_state=False)
    outs = _outs(method, views)
    pairs = view_pairs(4, pairing)
    assert len(pairs) == (6 if pairing == "all_pairs" else 3)
    expected = torch.stack([method.pair_loss(outs[i], outs[j], batch) for i, j in pairs]).mean(0)
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("name", SSL)
def test_filtered_method_masks_the_selected_dimensions_before_the_loss(name):
    cfg = _cfg(name, **{"data.num_views": 3, "method.multiview.filter_quantile": 0.25})
    method = _method(cfg)
    assert type(method).__name__.endswith("Filtered") and isinstance(method, METHODS[name])
    views, batch = _views(3)
    loss = method(views, batch)
    if name == "moco_v2":
        loss = method(views, batch, update_state=False)
    outs = _outs(method, views)
    key = "q" if name == "moco_v2" else "z"
    keep = extreme_feature_mask(torch.stack([o[key] for o in outs]), 0.25)
    assert (~keep).sum(1).eq(8).all()          # floor(0.25 * 32) dims per sample
    masked = [{n: t * keep for n, t in o.items()} for o in outs]
    if name == "moco_v2":
        masked = [{n: torch.nn.functional.normalize(t, dim=1) for n, t in o.items()} for o in masked]
    expected = torch.stack([method.pair_loss(masked[i], masked[j], batch) for i, j in view_pairs(3, "all_pairs")]).mean(0)
    assert torch.allclose(loss, expected, atol=1e-5)
    unfiltered = torch.stack([method.pair_loss(outs[i], outs[j], batch) for i, j in view_pairs(3, "all_pairs")]).mean(0)
    assert not torch.allclose(loss, unfiltered, atol=1e-4)
    loss.mean().backward()                         # the masked graph trains


def test_filter_off_keeps_the_registered_class_and_bad_combinations_fail():
    assert type(_method(_cfg("simclr"))) is METHODS["simclr"]
    with pytest.raises(ConfigError, match="method.multiview.filter_quantile"):
        with_feature_filter(METHODS["supervised"], _cfg("supervised", **{"method.multiview.filter_quantile": 0.1}))
    with pytest.raises(ConfigError, match="filter_quantile must be < 1"):
        with_feature_filter(METHODS["simclr"], _cfg("simclr", **{"method.multiview.filter_quantile": 1.0}))
