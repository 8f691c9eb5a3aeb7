"""The Method base class and the loss building blocks shared by the methods.

A method is a pure loss on a batch of views: ``method(views, batch)`` returns
the per-sample loss ``[B]`` (so an optimizer such as rwSAM can re-weight it).
The structure every method shares lives here:

    forward(views, batch, update_state)
      -> outs = embed_views(views, update_state)      # one dict per view ("z", "p", "q", "k", ...)
      -> outs = postprocess_views(outs, batch)         # hook (multi-view feature filtering)
      -> loss = combine(outs, batch)                   # mean of pair_loss over the view pairs
      -> loss * sample_weight(batch)                   # hook (TASE-style re-weighting), if any

``pair_loss(out_a, out_b, batch) -> [B]`` is the symmetric loss of two views.
The pairs over K views are ``all_pairs`` (every i < j, K(K-1)/2 pairs) or
``anchor`` (view 0 with each other view, K-1 pairs), from
``cfg.method.multiview.pairing``.

Per-sample temperatures plug into the contrastive losses through
``sample_temperature(batch) -> [B] | None`` (None: ``cfg.method.temperature``).

``update_state=False`` is SAM's second (perturbed) pass: BatchNorm running
statistics are left unchanged (momentum 0 for that pass), and stateful methods
(MoCo) neither update the momentum encoder nor enqueue. State changes that must
happen once per optimizer step and only after both passes (MoCo's enqueue) go
in ``end_step()``, which the trainer calls after each optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Method(nn.Module):
    """Base class: subclasses implement ``embed`` and ``pair_loss`` (or override ``combine``).

    Args:
        cfg: the whole :class:`ltssl.config.Config` (methods read ``cfg.method``, ``cfg.model``).
        encoder: the backbone, ``[B,3,S,S] -> [B, encoder.out_dim]``; evaluation uses its features.
        num_classes: classes of the training set (used by the supervised baseline).
    """

    #: fewest views the loss needs (pair losses need 2)
    min_views: int = 2

    def __init__(self, cfg, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.pairing = cfg.method.multiview.pairing
        self.temperature = cfg.method.temperature

    # ------------------------------------------------------------------ to implement
    def embed(self, view: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of one view ``[B,3,S,S]``: a dict of ``[B, ...]`` tensors."""
        raise NotImplementedError

    def pair_loss(self, out_a: dict, out_b: dict, batch: dict) -> torch.Tensor:
        """Symmetric per-sample loss ``[B]`` of two views' outputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    def sample_temperature(self, batch: dict) -> torch.Tensor | None:
        """Per-sample softmax temperature ``[B]`` for contrastive losses; None = the config's scalar."""
        return None

    def sample_weight(self, batch: dict) -> torch.Tensor | None:
        """Per-sample multiplier ``[B]`` of the method's loss (both SAM passes); None = 1."""
        return None

    def postprocess_views(self, outs: list[dict], batch: dict) -> list[dict]:
        """Transform all views' outputs together before pairing (e.g. the multi-view feature filter)."""
        return outs

    def wants_train_features(self, epoch: int) -> bool:
        """Whether ``on_train_features`` should receive the training set's features before ``epoch`` (0-based)."""
        return False

    def on_train_features(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        """Features ``[N, D]`` (L2-normalised, current encoder, row = sample index) of the training set."""

    def end_step(self) -> None:
        """Called once after each optimizer step (after SAM's second pass)."""

    # ------------------------------------------------------------------ structure
    def temperature_for(self, batch: dict) -> float | torch.Tensor:
        tau = self.sample_temperature(batch)
        return self.temperature if tau is None else tau

    def embed_views(self, views: list[torch.Tensor], update_state: bool) -> list[dict]:
        return [self.embed(v) for v in views]

    def combine(self, outs: list[dict], batch: dict) -> torch.Tensor:
        """Mean of ``pair_loss`` over the view pairs picked by ``self.pairing``: ``[B]``."""
        pairs = view_pairs(len(outs), self.pairing)
        losses = [self.pair_loss(outs[i], outs[j], batch) for i, j in pairs]
        return torch.stack(losses).mean(0)

    def forward(self, views: list[torch.Tensor], batch: dict, update_state: bool = True) -> torch.Tensor:
        """Per-sample loss ``[B]`` of a batch of ``K`` views (each ``[B,3,S,S]``)."""
        if len(views) < self.min_views:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_views} views, got {len(views)} (data.num_views)")
        with (contextlib.nullcontext() if update_state else frozen_bn_stats(self)):
            outs = self.embed_views(views, update_state)
            outs = self.postprocess_views(outs, batch)
            loss = self.combine(outs, batch)
        weight = self.sample_weight(batch)
        return loss if weight is None else loss * weight


def view_pairs(num_views: int, pairing: str) -> list[tuple[int, int]]:
    """The view pairs the loss averages: ``all_pairs`` (every (i, j), i < j) or ``anchor`` ((0, j), j >= 1)."""
    if num_views < 2:
        raise ValueError(f"data.num_views must be >= 2 for an SSL loss, got {num_views}")
    if pairing == "all_pairs":
        return [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
    if pairing == "anchor":
        return [(0, j) for j in range(1, num_views)]
    raise ValueError(f"method.multiview.pairing must be all_pairs or anchor, got {pairing!r}")


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """BatchNorm layers keep normalising with batch statistics but do not update running ones.

    Momentum 0 makes the running-stat update ``(1 - 0) * running + 0 * batch``, i.e.
    a no-op (the authors' SAM code does the same for the second pass).
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def mlp(dims: list[int], norm: str, last_norm: bool) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]`` with norm + ReLU between them.

    ``norm`` is the backbone's: ``batch`` -> BatchNorm1d, ``group`` -> LayerNorm (per-sample,
    so BN-free models stay BN-free). ``last_norm`` adds a norm (no ReLU) after the last layer.
    """

    def make_norm(d):
        return nn.BatchNorm1d(d) if norm == "batch" else nn.LayerNorm(d)

    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (not last or last_norm)))
        if not last:
            layers += [make_norm(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_norm:
            layers.append(make_norm(dims[i + 1]))
    return nn.Sequential(*layers)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated ``[W*B, ...]`` (gradients flow back) and this rank's row offset."""
    if not distributed():
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), 0), dist.get_rank() * x.shape[0]


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def _row_temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.shape != (like.shape[0],):
            raise ValueError(f"per-sample temperature must have shape [{like.shape[0]}], got {list(temperature.shape)}")
        return temperature.to(like.dtype).unsqueeze(1)
    return temperature


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020), symmetric, per sample: ``[B]``.

    Sample i's loss is the mean over its two anchors (a_i and b_i) of
    ``-log exp(s(a_i, b_i)/tau_i) / sum_{x != anchor} exp(s(anchor, x)/tau_i)`` with
    cosine similarity s, over the 2N - 1 other embeddings of the (global, under DDP)
    batch. ``temperature`` is a scalar or a per-sample ``[B]`` tensor (row i uses tau_i).
    """
    z_a = F.normalize(z_a.float(), dim=1)
    z_b = F.normalize(z_b.float(), dim=1)
    all_a, offset = gather_with_grad(z_a)
    all_b, _ = gather_with_grad(z_b)
    tau = _row_temperature(temperature, z_a)
    n_local, n_all = z_a.shape[0], all_a.shape[0]
    own = torch.arange(n_local, device=z_a.device) + offset
    self_mask = F.one_hot(own, n_all).bool()

    def anchor_loss(anchor, same_view, other_view):
        positives = anchor @ other_view.T / tau  # [B, N]; the positive is column own[i]
        negatives = (anchor @ same_view.T / tau).masked_fill(self_mask, float("-inf"))
        return F.cross_entropy(torch.cat([positives, negatives], 1), own, reduction="none")

    return 0.5 * (anchor_loss(z_a, all_a, all_b) + anchor_loss(z_b, all_b, all_a))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """InfoNCE of MoCo (He et al. 2020), per sample ``[B]``: positive key ``k`` vs the queue ``[K, D]``.

    ``q`` and ``k`` are L2-normalised ``[B, D]``; ``temperature`` scalar or ``[B]``.
    """
    tau = _row_temperature(temperature, q)
    q = q.float()
    positive = (q * k.float()).sum(1, keepdim=True)
    negative = q @ queue.float().T
    logits = torch.cat([positive, negative], 1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device), reduction="none")


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-cos(p, stopgrad(z))`` per sample ``[B]`` (SimSiam's D, Chen and He 2021)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1)
