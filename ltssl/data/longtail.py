"""Long-tailed subsets of a labelled pool, their same-n balanced counterparts, and split files.

The long-tail profile is the exponential one of Cao et al. (LDAM, NeurIPS 2019), used by
Liu et al. (ICLR 2022), SDCLR and BCL: with ``C`` classes ranked from frequent (rank 0) to
rare (rank C-1), the class of rank ``k`` keeps ``int(n_max * imbalance_ratio ** (-k / (C - 1)))``
images.

Which images are kept is decided per class by its own random stream,
``numpy.random.Generator(PCG64(SeedSequence([seed, STREAM, class_id])))``: the same seed gives
the same indices on every machine and numpy version that keeps PCG64 and ``permutation`` stable,
and changing one class's count never changes another class's images. Each class's pool is
permuted once; the LT subset keeps a prefix of that permutation, and so do the same-n balanced
counterpart and the probe subset. Subsets of one seed are therefore nested: the balanced and LT
subsets of a class share ``min(n_lt, n_bal)`` images (the pairing the manifest records).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

# Stream tags keep the random streams of different uses of one seed independent.
STREAM_SUBSET = 1
STREAM_SEMI_SYNTHETIC = 2
STREAM_POOL_SPLIT = 3


def make_rng(seed: int, *stream: int) -> np.random.Generator:
    """A PCG64 generator for ``(seed, *stream)``; never touches numpy's global state."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, stream)])))


def class_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Images kept per class rank: rank c keeps ``int(n_max * imbalance_ratio ** (-c / (num_classes - 1)))``.

    Cao et al. 2019 (LDAM) exponential profile. ``imbalance_ratio`` 1 is balanced. CIFAR-10,
    n_max 5000, ratio 100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50].
    """
    if int(num_classes) < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    if int(n_max) < 1:
        raise DataError(f"data.n_max must be >= 1, got {n_max}")
    if not float(imbalance_ratio) >= 1:
        raise DataError(f"data.imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [int(n_max)]
    counts = [int(n_max * float(imbalance_ratio) ** (-c / (num_classes - 1))) for c in range(num_classes)]
    if min(counts) < 1:
        raise DataError(
            f"data.n_max {n_max} with data.imbalance_ratio {imbalance_ratio} leaves the rarest class no image"
        )
    return counts


def resolve_class_order(num_classes: int, class_order: list[int] | None) -> list[int]:
    """Class ids from frequent to rare: ``class_order`` checked to be a permutation, else 0..C-1."""
    if class_order is None:
        return list(range(num_classes))
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise DataError(f"data.class_order must be a permutation of 0..{num_classes - 1}, got {list(class_order)}")
    return order


def balanced_counts(total: int, num_classes: int, class_order: list[int] | None = None) -> list[int]:
    """Per class id, ``total // C`` each; the remainder goes one image each to the most frequent classes.

    Deterministic: the first ``total % C`` classes of ``class_order`` (frequent to rare) get one more.
    """
    order = resolve_class_order(num_classes, class_order)
    base, rest = divmod(int(total), num_classes)
    counts = [base] * num_classes
    for cls in order[:rest]:
        counts[cls] += 1
    return counts


def class_groups(counts: list[int], scheme: str = "thirds") -> dict[str, list[int]]:
    """Many / medium / few class ids.

    ``thirds`` (CIFAR-scale, SDCLR/BCL): classes sorted by training count (ties by class id) and cut
    into three near-equal parts, the larger parts first (10 classes: 4 / 3 / 3).
    ``imagenet`` (ImageNet-LT / Places-LT, Liu et al. 2019 OLTR): many > 100 images,
    medium 20-100, few < 20.
    """
    if scheme == "thirds":
        ranked = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        parts = np.array_split(np.array(ranked, dtype=np.int64), 3)
        return {name: sorted(int(c) for c in part) for name, part in zip(("many", "medium", "few"), parts)}
    if scheme == "imagenet":
        return {
            "many": [c for c, n in enumerate(counts) if n > 100],
            "medium": [c for c, n in enumerate(counts) if 20 <= n <= 100],
            "few": [c for c, n in enumerate(counts) if n < 20],
        }
    raise DataError(f"class group scheme must be thirds or imagenet, got {scheme!r}")


def class_pools(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per class id, the pool positions holding that class (ascending)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"label {int(bad)} out of range 0..{num_classes - 1}")
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def permuted_pools(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Per class id, its pool positions in the seeded order subsets take prefixes of."""
    return [make_rng(seed, STREAM_SUBSET, c).permutation(pool) for c, pool in enumerate(class_pools(labels, num_classes))]


def take_prefixes(perms: list[np.ndarray], counts: list[int], what: str = "subset") -> np.ndarray:
    """Ascending pool positions: the first ``counts[c]`` of each class's permutation."""
    for c, (perm, n) in enumerate(zip(perms, counts)):
        if n > len(perm):
            raise DataError(f"{what} needs {n} images of class {c}, but the source holds only {len(perm)}")
    chosen = [perm[:n] for perm, n in zip(perms, counts)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


@dataclass
class LongTailSubset:
    """A long-tailed subset of a pool and its same-n balanced counterpart (pool positions, ascending)."""

    indices: np.ndarray              # LT subset: pool positions, ascending
    counts: list[int]                # LT images per class id
    balanced_indices: np.ndarray     # balanced subset with the same total
    balanced_counts: list[int]
    class_order: list[int]           # class ids, frequent to rare
    n_max: int
    imbalance_ratio: float
    seed: int
    shared_per_class: list[int] = field(default_factory=list)  # images both subsets hold, per class

    @property
    def n(self) -> int:
        return int(sum(self.counts))


def longtail_subset(
    labels: np.ndarray,
    num_classes: int,
    imbalance_ratio: float,
    *,
    n_max: int | None = None,
    seed: int = 0,
    class_order: list[int] | None = None,
) -> LongTailSubset:
    """Sample the exponential LT subset of ``labels`` and its same-n balanced counterpart.

    labels: int [N] class ids of the pool. ``n_max`` None takes the most the smallest class allows
    (every class must hold ``n_max`` images so that any class order and the ratio-1 profile work).
    """
    if not float(imbalance_ratio) >= 1:
        raise DataError(f"data.imbalance_ratio must be >= 1, got {imbalance_ratio}")
    order = resolve_class_order(num_classes, class_order)
    pools = class_pools(labels, num_classes)
    smallest = min(len(p) for p in pools)
    if n_max is None:
        n_max = smallest
    if n_max < 1:
        raise DataError(f"data.n_max must be >= 1, got {n_max}")
    if n_max > smallest:
        cls = min(range(num_classes), key=lambda c: len(pools[c]))
        raise DataError(f"data.n_max {n_max} is larger than the smallest class holds ({smallest} images of class {cls})")
    by_rank = class_counts(n_max, num_classes, imbalance_ratio)
    counts = [0] * num_classes
    for rank, cls in enumerate(order):
        counts[cls] = by_rank[rank]
    perms = permuted_pools(labels, num_classes, seed)
    indices = take_prefixes(perms, counts, "the long-tailed subset")
    bal = balanced_counts(sum(counts), num_classes, order)
    balanced_indices = take_prefixes(perms, bal, "the balanced subset")
    return LongTailSubset(
        indices=indices,
        counts=counts,
        balanced_indices=balanced_indices,
        balanced_counts=bal,
        class_order=order,
        n_max=int(n_max),
        imbalance_ratio=float(imbalance_ratio),
        seed=int(seed),
        shared_per_class=[min(a, b) for a, b in zip(counts, bal)],
    )


def balanced_counterpart(
    labels: np.ndarray, subset_indices: np.ndarray, num_classes: int, *, seed: int = 0, class_order: list[int] | None = None
) -> np.ndarray:
    """The balanced subset of the pool with the same total as ``subset_indices`` (any given subset).

    Per class ``n // C`` images, the remainder spread over the most frequent classes
    (:func:`balanced_counts`); the images are prefixes of the seeded class permutations, so for a
    subset made by :func:`longtail_subset` with the same seed this equals its ``balanced_indices``.
    """
    order = resolve_class_order(num_classes, class_order)
    counts = balanced_counts(len(subset_indices), num_classes, order)
    return take_prefixes(permuted_pools(labels, num_classes, seed), counts, "the balanced subset")


# ----------------------------------------------------------------------------- split files


def read_split_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """ImageNet-LT / Places-LT list: ``relative/path.JPEG label`` per line -> (paths, int64 labels).

    Blank lines are skipped; a line without exactly a path and an integer label >= 0 raises
    DataError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DataError(f"split file {path} line {lineno}: expected 'relative/path label', got {line.strip()!r}")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"split file {path} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def read_index_file(path: str | os.PathLike, pool_size: int | None = None) -> np.ndarray:
    """Whitespace-separated non-negative integers (e.g. one per line) -> int64 [n], checked < pool_size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"index file {path} does not exist")
    tokens = path.read_text(encoding="utf-8").split()
    if not tokens:
        raise DataError(f"index file {path} lists no index")
    for tok in tokens:
        if not tok.isdigit():
            raise DataError(f"index file {path}: expected non-negative integers, got {tok!r}")
    indices = np.asarray([int(t) for t in tokens], dtype=np.int64)
    if pool_size is not None and indices.max() >= pool_size:
        raise DataError(f"index file {path}: index {int(indices.max())} out of range for a pool of {pool_size} images")
    if len(np.unique(indices)) != len(indices):
        raise DataError(f"index file {path} repeats an index")
    return indices


# ----------------------------------------------------------------------------- semi-synthetic


def semi_synthetic_partners(
    labels: np.ndarray, subset_indices: np.ndarray, rare_classes: list[int], pool_labels: np.ndarray, seed: int
) -> np.ndarray:
    """For each subset image, the pool position of the rare-class image it carries, or -1 (blank half).

    Liu et al. (ICLR 2022, sec. 3.3) semi-synthetic data: an image of a frequent class carries an
    image of a rare class beside it; an image of a rare class carries a blank half. Partners are
    drawn uniformly with replacement from all pool images of the rare classes, from the seeded
    stream ``(seed, STREAM_SEMI_SYNTHETIC)``, so frequent images expose rare-class features that
    the rare classes' own (few) training images do not.

    labels: [n] class ids of the subset images; pool_labels: [N] class ids of the whole pool.
    """
    rare = np.isin(np.asarray(pool_labels), np.asarray(rare_classes, dtype=np.int64))
    rare_pool = np.flatnonzero(rare)
    if rare_pool.size == 0:
        raise DataError("semi-synthetic data needs at least one rare-class image in the pool")
    rng = make_rng(seed, STREAM_SEMI_SYNTHETIC)
    draws = rare_pool[rng.integers(0, rare_pool.size, size=len(subset_indices))]
    is_frequent = ~np.isin(np.asarray(labels), np.asarray(rare_classes, dtype=np.int64))
    return np.where(is_frequent, draws, -1).astype(np.int64)


def compose_side_by_side(left: np.ndarray, right: np.ndarray | None) -> np.ndarray:
    """uint8 [n,H,W,3] + [n,H,W,3] (None = blank, zeros) -> uint8 [n,H,2W,3], left image first."""
    if right is None:
        right = np.zeros_like(left)
    return np.concatenate([left, right], axis=2)
