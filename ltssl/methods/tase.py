"""TASE: pseudo-label driven per-sample temperature and weight for contrastive SSL.

Xiao et al., "Dataset Awareness is not Enough: Implementing Sample-level Tail
Encouragement in Long-tailed Self-supervised Learning" (arXiv 2410.22883, 2024;
its v1 was titled "Adaptive Paradigm Synergy"). Only the paper's abstract was
reachable when this was written (no public code, no equations), so the rules
below are this suite's design *from the abstract*: pseudo-labels (clusters of the
features) give every sample a temperature of its own, and a re-weighting adds the
quantity awareness that the temperature alone lacks, on an InfoNCE base. The
equation numbers of the paper could not be read and are not cited; every constant
is a field of ``cfg.method.tase`` so sweeps can search it.

The direction of the temperature follows Kukleva et al. (ICLR 2023, "Temperature
Schedules for self-supervised contrastive methods on long-tail data"): a small
temperature emphasises instance discrimination (what rare, tail-like groups need),
a large one group-wise discrimination (what frequent groups benefit from).

Rules (N training samples, features L2-normalised, k = ``num_clusters``)
----------------------------------------------------------------------
1. Pseudo-labels. Every ``refresh_every`` epochs (from ``start_epoch`` on) the
   features ``f_i`` (shape [N, D], unit norm) of all training samples are
   clustered by spherical k-means (cosine similarity; k-means++ seeding from a
   ``torch.Generator`` seeded with ``seed``; ``kmeans_iters`` Lloyd steps; an
   emptied cluster is re-seeded with the sample farthest from its centroid), all
   under ``no_grad``. Pseudo-label ``c(i)`` in {0..k-1}; cluster size ``n_c``
   (samples), ``n_max = max_c n_c``. Under DDP the assignment is computed from the
   same all-sample features on every rank and then broadcast from rank 0, so all
   ranks hold the identical pseudo-labels.
2. Per-sample temperature, in [tau_min, tau_max]::

       tau_c = tau_min + (tau_max - tau_min) * (n_c / n_max) ** temperature_power
       tau_i = tau_{c(i)}

   The largest cluster gets ``tau_max`` (grouping); a cluster with few samples
   gets a temperature near ``tau_min`` (instance discrimination). On balanced
   clusters every sample gets ``tau_max``.
3. Per-sample weight (quantity awareness), normalised to mean 1 over the N
   training samples::

       w_c = n_c ** (-weight_power) * N / sum_c' n_c' ** (1 - weight_power)
       w_i = w_{c(i)}          so that (1/N) sum_i w_i = 1

   ``weight_power = 0`` gives w_i = 1 (temperature only).
4. Loss. For the anchor ``i`` of a batch, the InfoNCE row of its logits is
   divided by ``tau_i`` instead of the global temperature, and its loss is
   multiplied by ``w_i``: ``L = (1/B) sum_i w_i * l_i(tau_i)``. Both are looked
   up by the sample's index in the training file (``batch["index"]``). Before the
   first clustering (epochs before ``start_epoch``) the loss uses the method's
   global temperature and weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ltssl.config import ConfigError

__all__ = [
    "kmeans",
    "cluster_temperatures",
    "cluster_weights",
    "TaseAssignment",
    "TaseState",
]


@torch.no_grad()
def kmeans(features: Tensor, num_clusters: int, *, seed: int = 0, iters: int = 30) -> tuple[Tensor, Tensor]:
    """Spherical k-means of unit-norm ``features`` [N, D].

    Returns ``(assignments LongTensor [N] in [0, k), centroids [k, D] unit norm)``.
    Deterministic for a given ``seed`` (k-means++ seeding drawn from a CPU generator,
    ties in the assignment broken by the lowest cluster id).
    """
    if features.dim() != 2:
        raise ValueError(f"kmeans: features must be [N, D], got shape {tuple(features.shape)}")
    n = features.shape[0]
    if num_clusters < 1 or num_clusters > n:
        raise ValueError(f"kmeans: num_clusters must be in [1, {n}] (the number of samples), got {num_clusters}")
    x = torch.nn.functional.normalize(features.detach().float(), dim=1)
    gen = torch.Generator().manual_seed(int(seed))
    # k-means++ on the cosine distance 1 - x.c (>= 0 on the unit sphere).
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    dist_min = (1.0 - x @ x[first]).clamp_min(0)
    for _ in range(1, num_clusters):
        total = float(dist_min.sum())
        if total <= 0:  # all remaining points coincide with a centroid: take any not yet chosen
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(dist_min.cpu() / total, 1, generator=gen))
        centroids.append(x[idx])
        dist_min = torch.minimum(dist_min, (1.0 - x @ x[idx]).clamp_min(0))
    c = torch.stack(centroids)
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(max(1, iters)):
        sim = x @ c.T  # [N, k]
        new_assign = sim.argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, new_assign, x)
        counts = torch.bincount(new_assign, minlength=num_clusters)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            # Re-seed each emptied cluster with the sample worst served by its centroid.
            worst = (1.0 - sim.gather(1, new_assign[:, None]).squeeze(1)).clone()
            for cid in empty:
                j = int(worst.argmax())
                worst[j] = -1.0
                counts[new_assign[j]] -= 1
                sums[new_assign[j]] -= x[j]
                new_assign[j] = cid
                sums[cid] = x[j]
                counts[cid] = 1
        c = torch.nn.functional.normalize(sums, dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign, c


def cluster_temperatures(
    cluster_sizes: Tensor, tau_min: float, tau_max: float, temperature_power: float = 0.5
) -> Tensor:
    """``tau_c = tau_min + (tau_max - tau_min) * (n_c / n_max) ** temperature_power`` (rule 2).

    ``cluster_sizes`` [k] sample counts (an empty cluster gets ``tau_min``); returns float [k].
    """
    if tau_min > tau_max:
        raise ValueError(f"tau_min must be <= tau_max, got {tau_min} > {tau_max}")
    sizes = cluster_sizes.double()
    rel = sizes / sizes.max().clamp_min(1)
    return (tau_min + (tau_max - tau_min) * rel.pow(temperature_power)).float()


def cluster_weights(cluster_sizes: Tensor, weight_power: float) -> Tensor:
    """``w_c = n_c ** -p * N / sum_c n_c ** (1 - p)`` (rule 3): mean 1 over the samples.

    ``cluster_sizes`` [k]; returns float [k] (0 for an empty cluster, which no sample uses).
    """
    sizes = cluster_sizes.double()
    nonempty = sizes > 0
    raw = torch.zeros_like(sizes)
    raw[nonempty] = sizes[nonempty].pow(-weight_power)
    total = sizes.sum()
    return (raw * total / (raw * sizes).sum()).float()


@dataclass
class TaseAssignment:
    """One clustering: pseudo-labels [N], cluster sizes [k], per-sample tau [N] and weight [N]."""

    pseudo_labels: Tensor
    cluster_sizes: Tensor
    temperatures: Tensor
    weights: Tensor
    epoch: int


def assign(features: Tensor, tase_cfg, *, seed: int, epoch: int = 0) -> TaseAssignment:
    """Rules 1-3 on all-sample features [N, D] (unit norm); identical on every DDP rank."""
    labels, _ = kmeans(features, tase_cfg.num_clusters, seed=seed, iters=tase_cfg.kmeans_iters)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Rank 0's pseudo-labels win: floating-point k-means could differ across devices.
        backend_dev = labels.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
        buf = labels.to(backend_dev)
        dist.broadcast(buf, src=0)
        labels = buf.to(labels.device)
    sizes = torch.bincount(labels, minlength=tase_cfg.num_clusters)
    tau_c = cluster_temperatures(sizes, tase_cfg.tau_min, tase_cfg.tau_max, tase_cfg.temperature_power)
    w_c = cluster_weights(sizes, tase_cfg.weight_power)
    return TaseAssignment(labels.cpu(), sizes.cpu(), tau_c.cpu()[labels.cpu()], w_c.cpu()[labels.cpu()], epoch)


class TaseState:
    """The per-sample temperatures and weights a contrastive method looks up by ``batch["index"]``.

    ``update(features, epoch)`` re-clusters when ``epoch`` is due (rule 1);
    ``temperatures(index)`` / ``weights(index)`` return float [B] on ``index``'s
    device, or ``None`` before the first clustering (the method then uses its global
    temperature and weight 1). ``state_dict``/``load_state_dict`` carry the current
    assignment through checkpoints.
    """

    def __init__(self, tase_cfg, *, seed: int = 0):
        self.cfg = tase_cfg
        self.seed = int(seed)
        self.current: TaseAssignment | None = None

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) should (re)cluster: from ``start_epoch``, every ``refresh_every``."""
        if not self.cfg.enabled or epoch < self.cfg.start_epoch:
            return False
        if self.current is None:
            return True
        return (epoch - self.cfg.start_epoch) % self.cfg.refresh_every == 0 and epoch != self.current.epoch

    @torch.no_grad()
    def update(self, features: Tensor, epoch: int) -> bool:
        """Re-cluster all-sample features [N, D] if ``epoch`` is due; returns whether it did."""
        if not self.due(epoch):
            return False
        self.current = assign(features, self.cfg, seed=self.seed + epoch, epoch=epoch)
        return True

    def temperatures(self, index: Tensor) -> Tensor | None:
        if self.current is None:
            return None
        return self.current.temperatures[index.cpu()].to(index.device)

    def weights(self, index: Tensor) -> Tensor | None:
        if self.current is None:
            return None
        return self.current.weights[index.cpu()].to(index.device)

    def state_dict(self) -> dict:
        if self.current is None:
            return {}
        a = self.current
        return {
            "pseudo_labels": a.pseudo_labels,
            "cluster_sizes": a.cluster_sizes,
            "temperatures": a.temperatures,
            "weights": a.weights,
            "epoch": a.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.current = TaseAssignment(**state) if state else None


# ----------------------------------------------------------------------------- the method option

#: methods whose pair loss is InfoNCE with ``temperature_for(batch)`` (TASE's base)
TASE_METHODS = ("simclr", "moco_v2")


class TaseMixin:
    """TASE on a contrastive :class:`ltssl.methods.base.Method` (rules 1-4 above).

    Fills the base class's hooks: ``wants_train_features``/``on_train_features``
    (re-cluster the all-sample encoder features), ``sample_temperature`` (tau_i) and
    ``sample_weight`` (w_i), looked up by ``batch["index"]``. The assignment travels in
    the module's ``state_dict`` (``_extra_state``), so a resumed run keeps it.
    """

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        self.tase = TaseState(cfg.method.tase, seed=cfg.train.seed)

    def wants_train_features(self, epoch: int) -> bool:
        return self.tase.due(epoch) or super().wants_train_features(epoch)

    def on_train_features(self, features: Tensor, labels: Tensor, epoch: int) -> None:
        super().on_train_features(features, labels, epoch)
        self.tase.update(features, epoch)

    def sample_temperature(self, batch: dict) -> Tensor | None:
        return self.tase.temperatures(batch["index"])

    def sample_weight(self, batch: dict) -> Tensor | None:
        return self.tase.weights(batch["index"])

    def get_extra_state(self) -> dict:
        return self.tase.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.tase.load_state_dict(state)


def with_tase(cls: type, cfg) -> type:
    """``cls`` itself, or a subclass with :class:`TaseMixin` when ``cfg.method.tase.enabled``."""
    if not cfg.method.tase.enabled:
        return cls
    if cfg.method.name not in TASE_METHODS:

        raise ConfigError(
            f"method.tase.enabled needs a contrastive method.name ({', '.join(TASE_METHODS)}), got {cfg.method.name!r}"
        )
    return type(f"{cls.__name__}TASE", (TaseMixin, cls), {"__module__": cls.__module__})
