"""rwSAM's per-sample ascent weights (Liu, HaoChen, Gaidon and Ma, ICLR 2022, Sec. 4).

rwSAM perturbs the weights with the gradient of the re-weighted loss
``sum_i w_i l_i / sum_i w_i``, so that rare examples shape the sharpness the
optimizer avoids. Schemes (``cfg.optim.weighting``):

- ``none``: w = 1 (plain SAM).
- ``label_power``: w = base ** class_rank, rank 0 = the most frequent class by train
  count (ties: lower class id first); the authors used base 1.2 on CIFAR-10-LT.
- ``kde``: Gaussian kernel density of L2-normalised features (paper Sec. 4: weights
  ~ inverse density, estimated without labels); w_i ~ density_i ** (-alpha).

All weights are normalised to mean 1 over the training set (the ascent loss divides by
the sum of the batch's weights, so the scale never matters; mean 1 makes the logged
statistics comparable across schemes). alpha = 0 gives all ones, i.e. SAM.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def class_ranks(class_counts: list[int]) -> torch.Tensor:
    """Rank of each class by train count, 0 = most frequent (stable: ties keep class-id order). ``[C]``."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    ranks = torch.empty(len(class_counts), dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(len(class_counts))
    return ranks


def label_power_weights(class_counts: list[int], base: float) -> torch.Tensor:
    """Per-class weight ``base ** rank`` ``[C]``, scaled so the mean over training samples is 1."""
    counts = torch.tensor(class_counts, dtype=torch.float64)
    raw = torch.tensor(float(base), dtype=torch.float64) ** class_ranks(class_counts).double()
    mean = (raw * counts).sum() / counts.sum()
    return (raw / mean).float()


def kde_log_density(features: torch.Tensor, bandwidth: float, rows: torch.Tensor | None = None,
                    chunk_elements: int = 1 << 26) -> torch.Tensor:
    """Log Gaussian-kernel density (up to a constant) of ``features[rows]`` among all ``features``.

    ``features`` ``[N, D]`` L2-normalised; kernel ``exp(-||f_i - f_j||^2 / (2 h^2))``, which on the
    unit sphere is ``exp((f_i . f_j - 1) / h^2)``; the sum includes j = i, so an isolated point
    has density 1/N rather than 0. Computed ``chunk_elements // N`` rows at a time (N = 50k
    takes 1.3k rows, 256 MB, per chunk). Returns ``[len(rows)]`` (``[N]`` when rows is None),
    ``log(mean_j kernel_ij)``.
    """
    n = features.shape[0]
    rows = torch.arange(n, device=features.device) if rows is None else rows.to(features.device)
    chunk = max(1, chunk_elements // max(n, 1))
    out = []
    inv_h2 = 1.0 / (bandwidth * bandwidth)
    for start in range(0, rows.shape[0], chunk):
        sims = features[rows[start:start + chunk]] @ features.T  # [chunk, N]
        out.append(torch.logsumexp((sims.float() - 1.0) * inv_h2, dim=1) - math.log(n))
    return torch.cat(out) if out else features.new_zeros(0)


def kde_weights(features: torch.Tensor, bandwidth: float, alpha: float) -> torch.Tensor:
    """rwSAM KDE weights ``[N]``: ``w_i ~ density_i ** -alpha``, mean 1; all ones at alpha = 0.

    ``features`` ``[N, D]`` L2-normalised, the same on every rank. Under DDP each rank
    computes the density of a contiguous shard of rows and the shards are all-gathered.
    """
    n = features.shape[0]
    if alpha == 0:
        return torch.ones(n, device=features.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        per_rank = -(-n // world)
        rows = torch.arange(rank * per_rank, min(n, (rank + 1) * per_rank), device=features.device)
        local = torch.full((per_rank,), 0.0, device=features.device)
        local[: rows.shape[0]] = kde_log_density(features, bandwidth, rows)
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local)
        log_density = torch.cat(shards)[:n]
    else:
        log_density = kde_log_density(features, bandwidth)
    log_w = -alpha * log_density.double()
    w = torch.exp(log_w - log_w.max())
    return (w / w.mean()).float()


class SampleWeights:
    """The weights of the current scheme, looked up per batch.

    ``batch_weights(batch) -> [B] | None`` (None for ``none``): by ``batch["label"]`` for
    ``label_power``, by ``batch["index"]`` (the sample's index in the train file) for ``kde``.
    ``stats()`` gives the dataset-level mean and max for the metrics.
    """

    def __init__(self, scheme: str, class_counts: list[int], n_train: int, device, label_power_base: float = 1.2):
        if scheme not in ("none", "label_power", "kde"):
            raise ValueError(f"optim.weighting must be one of none, label_power, kde, got {scheme!r}")
        self.scheme = scheme
        self.n_train = n_train
        self.device = torch.device(device)
        self.class_counts = list(class_counts)
        self.per_class = label_power_weights(class_counts, label_power_base).to(self.device) if scheme == "label_power" else None
        self.per_sample = torch.ones(n_train, device=self.device) if scheme == "kde" else None
        self.kde_epoch = -1  # the epoch whose start computed per_sample; -1 = not yet

    def set_kde(self, weights: torch.Tensor, epoch: int) -> None:
        if weights.shape != (self.n_train,):
            raise ValueError(f"kde weights must have shape [{self.n_train}], got {list(weights.shape)}")
        self.per_sample = weights.to(self.device, torch.float32)
        self.kde_epoch = epoch

    def batch_weights(self, batch: dict) -> torch.Tensor | None:
        if self.scheme == "label_power":
            return self.per_class[batch["label"]]
        if self.scheme == "kde":
            return self.per_sample[batch["index"]]
        return None

    def stats(self) -> dict:
        if self.scheme == "label_power":
            counts = torch.tensor(self.class_counts, device=self.device, dtype=torch.float32)
            return {"weight_mean": float((self.per_class * counts).sum() / counts.sum()), "weight_max": float(self.per_class.max())}
        if self.scheme == "kde":
            return {"weight_mean": float(self.per_sample.mean()), "weight_max": float(self.per_sample.max())}
        return {"weight_mean": 1.0, "weight_max": 1.0}

    def state_dict(self) -> dict:
        return {"scheme": self.scheme, "kde_epoch": self.kde_epoch,
                "per_sample": None if self.per_sample is None else self.per_sample.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["scheme"] != self.scheme:
            raise ValueError(f"checkpoint weights use optim.weighting={state['scheme']}, config says {self.scheme}")
        self.kde_epoch = state["kde_epoch"]
        if state["per_sample"] is not None:
            self.per_sample = state["per_sample"].to(self.device)
