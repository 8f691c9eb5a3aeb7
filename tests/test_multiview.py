"""Multi-view SSL: the extreme-feature filter, the view pairing, and K-view losses of the methods."""

from __future__ import annotations

import pytest
import torch

from ltssl.methods.multiview import extreme_feature_mask, extreme_statistic, filter_views, view_pairs


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
    with pytest.raises(ValueError, match="num_views"):
        view_pairs(1, "all_pairs")
