"""Multi-view SSL: the extreme-feature filter applied to K >= 2 views before the loss.

Sharma and Padmanabhan, "Maximally Useful and Minimally Redundant: more than two
views" (arXiv 2509.08469, 2025; v2 names the method MIMV, multiple images with
multiple views). Only its abstract was reachable when this was written (no public
code, no equations): more than two views per image, a loss that "filters extreme
features" so that it keeps what is shared and useful across the views and leaves out
what is redundant or noisy. The rule below is this suite's design from that
sentence; its constants are ``cfg.method.multiview.*``. The paper's other parts
(views that are only normalised, an information-bottleneck view) are not
implemented here: the K views all come from the same augmentation recipe.

The averaging over view pairs (``pairing``: ``all_pairs`` = all K(K-1)/2 unordered
pairs; ``anchor`` = view 0 against each of views 1..K-1) lives in the methods' base
class (:meth:`ltssl.methods.base.Method.forward`); this module owns the filter.

Filter rule
-----------
Let ``z[k, b, d]`` be the projection (the tensor the loss compares; SimSiam's,
SimCLR's and MoCo's ``z``) of view ``k`` of sample ``b`` in dimension ``d``, with K
views and D dimensions, and ``q = filter_quantile`` in [0, 1). Computed under
``no_grad`` on each step's batch:

* statistic ``spread`` (default): ``s[b, d] = max_k z[k, b, d] - min_k z[k, b, d]``,
  how much the views disagree on that dimension (view-specific, not shared).
* statistic ``zscore``: ``s[b, d] = max_k |z[k, b, d] - mu_d| / sigma_d`` with
  ``mu_d``, ``sigma_d`` the mean and standard deviation of dimension ``d`` over
  the batch and the views: how extreme the most extreme view's value is.

For every sample, the ``n_drop = floor(q * D)`` dimensions with the largest
``s[b, :]`` (the ones beyond the sample's ``(1 - q)`` quantile; ties broken towards
the lower dimension index) are masked: set to 0 in every view's ``z`` and in any
other per-view tensor of width D (SimSiam's prediction ``p``), so neither the loss
nor the gradient sees them; the loss's own L2 normalisation then works on the kept
dimensions. ``q = 0`` is off (the features pass through unchanged).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ltssl.config import ConfigError

__all__ = ["STATISTICS", "extreme_statistic", "extreme_feature_mask", "filter_views", "with_feature_filter"]

STATISTICS = ("spread", "zscore")


@torch.no_grad()
def extreme_statistic(z: Tensor, statistic: str = "spread") -> Tensor:
    """Per-sample, per-dimension extremeness ``s`` [B, D] of views ``z`` [K, B, D] (see module docstring)."""
    if z.dim() != 3:
        raise ValueError(f"extreme_statistic: z must be [K, B, D], got shape {tuple(z.shape)}")
    z = z.detach().float()
    if statistic == "spread":
        if z.shape[0] < 2:
            raise ValueError("extreme_statistic: statistic 'spread' needs at least 2 views")
        return z.amax(dim=0) - z.amin(dim=0)
    if statistic == "zscore":
        flat = z.reshape(-1, z.shape[-1])
        mu = flat.mean(dim=0)
        sigma = flat.std(dim=0, unbiased=False).clamp_min(1e-12)
        return ((z - mu) / sigma).abs().amax(dim=0)
    raise ValueError(f"method.multiview.filter_statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")


@torch.no_grad()
def extreme_feature_mask(z: Tensor, quantile: float, statistic: str = "spread") -> Tensor:
    """Bool mask [B, D] of the kept dimensions (True = kept) of views ``z`` [K, B, D].

    Per sample, the ``floor(quantile * D)`` dimensions with the largest statistic are
    dropped; ties drop the lower dimension index first.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"method.multiview.filter_quantile must be in [0, 1), got {quantile}")
    _, batch, dim = z.shape
    keep = torch.ones(batch, dim, dtype=torch.bool, device=z.device)
    n_drop = math.floor(quantile * dim)
    if n_drop == 0:
        return keep
    s = extreme_statistic(z, statistic)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    keep.scatter_(1, order[:, :n_drop], False)
    return keep


def filter_views(outs: list[dict], quantile: float, statistic: str = "spread", key: str = "z") -> list[dict]:
    """Mask the extreme dimensions of every view's outputs (the filter rule).

    ``outs``: one dict per view (the method's ``embed`` output), each holding ``key``
    [B, D]. Returns new dicts in which every tensor of shape [B, D] is multiplied by
    the (detached) keep mask; other entries pass through. ``quantile == 0``: ``outs``
    itself.
    """
    if quantile <= 0 or not outs:
        return outs
    z = torch.stack([o[key] for o in outs])
    keep = extreme_feature_mask(z, quantile, statistic).to(z.dtype)
    shape = z.shape[1:]
    return [{name: (t * keep if torch.is_tensor(t) and t.shape == shape else t) for name, t in o.items()} for o in outs]


# ----------------------------------------------------------------------------- the method option

#: per method: the per-view output the statistic is computed on, and outputs re-L2-normalised after masking
FILTER_KEYS = {"simsiam": ("z", ()), "simclr": ("z", ()), "moco_v2": ("q", ("q", "k"))}


class FeatureFilterMixin:
    """The extreme-feature filter in the base class's ``postprocess_views`` hook (before pairing).

    MoCo's query and key are unit vectors against a unit-vector queue, so after masking they
    are re-normalised; SimCLR's NT-Xent and SimSiam's cosine normalise by themselves.
    """

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        mv = cfg.method.multiview
        self.filter_quantile = mv.filter_quantile
        self.filter_statistic = mv.filter_statistic
        self.filter_key, self.filter_renormalise = FILTER_KEYS[cfg.method.name]

    def postprocess_views(self, outs: list[dict], batch: dict) -> list[dict]:
        outs = super().postprocess_views(outs, batch)
        filtered = filter_views(outs, self.filter_quantile, self.filter_statistic, key=self.filter_key)
        if self.filter_renormalise and filtered is not outs:
            for o in filtered:
                for name in self.filter_renormalise:
                    o[name] = torch.nn.functional.normalize(o[name], dim=1)
        return filtered


def with_feature_filter(cls: type, cfg) -> type:
    """``cls`` itself, or a subclass with :class:`FeatureFilterMixin` when the filter is on."""
    mv = cfg.method.multiview
    if mv.filter_quantile <= 0:
        return cls

    if cfg.method.name not in FILTER_KEYS:
        raise ConfigError(
            f"method.multiview.filter_quantile > 0 needs an SSL method.name ({', '.join(FILTER_KEYS)}), got {cfg.method.name!r}"
        )
    if mv.filter_quantile >= 1:
        raise ConfigError(f"method.multiview.filter_quantile must be < 1 (1 would mask every dimension), got {mv.filter_quantile}")
    if mv.filter_statistic == "spread" and cfg.data.num_views < 2:
        raise ConfigError(f"method.multiview.filter_statistic spread needs data.num_views >= 2, got {cfg.data.num_views}")
    return type(f"{cls.__name__}Filtered", (FeatureFilterMixin, cls), {"__module__": cls.__module__})
