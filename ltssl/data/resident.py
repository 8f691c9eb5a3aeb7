"""The training set resident on the training device: decoded once, batches by index gather.

A CIFAR-scale long-tailed set is small once decoded (N x H x W x 3 bytes), so instead of streaming
it through FFCV every epoch, :class:`ResidentLoader` keeps it as one uint8 tensor ``[N,3,H,W]``
on the device and serves each batch by an index gather plus the batched augmentation of
:mod:`ltssl.data.augment` on that device: no loader threads, no per-epoch decode.

It keeps the streaming :class:`ltssl.data.ffcv.SSLLoader`'s contract, batch for batch: the same
sample order (FFCV's RANDOM order: numpy's ``default_rng(seed + epoch)`` permutation on one
process, torch's DistributedSampler shard of rank r when distributed), the same number of
batches, and views drawn from the same generator ``(seed, epoch, step, rank)``; so on one
device the two loaders yield the same batches, and ``epoch(e, start_step=k)`` yields batches
k, k+1, ... of an uninterrupted epoch e.

The ``.beton`` stays the source of truth. Its decoded copy is cached beside it as
``<file>.decoded-<sha256 prefix>[-<side>].npz`` (images and labels, keyed by the checksum in the
file's sidecar, checked against their own sha256 on load); a rewritten .beton gets a new key and the old copy is removed.

:func:`ssl_loader` chooses between the two loaders (``data.resident``: auto, on, off) and takes the
SSLLoader constructor's arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ltssl.config import DataConfig
from ltssl.io import atomic_write, atomic_write_json

from . import ffcv as _ffcv
from .augment import CompiledPixels, Recipe, generator_for, get_recipe, make_views, view_pixels
from .errors import DataError

RESIDENT_CHOICES = tuple(next(f for f in dataclasses.fields(DataConfig) if f.name == "resident").metadata["choices"])


def sample_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's positions ``[n_rank]`` (int64, into 0..num_samples-1) for ``epoch``: FFCV's RANDOM order.

    One process: ``np.random.default_rng(seed + epoch).permutation(num_samples)``. Several:
    torch's ``DistributedSampler(shuffle=True, seed=seed, drop_last=False)`` shard of ``rank`` (the
    permutation padded with its first samples to a multiple of the world size, then every
    ``world_size``-th position from ``rank``).
    """
    if world_size == 1:
        return np.random.default_rng(int(seed) + int(epoch)).permutation(int(num_samples)).astype(np.int64)
    sampler = DistributedSampler(range(int(num_samples)), num_replicas=int(world_size), rank=int(rank), shuffle=True,
                                 seed=int(seed), drop_last=False)
    sampler.set_epoch(int(epoch))
    return np.fromiter(iter(sampler), dtype=np.int64)


class ResidentLoader:
    """K augmented views per image from a dataset held on ``device`` (same batches as SSLLoader).

    images: uint8 ``[N,3,H,W]`` (any device; moved to ``device`` once); labels: int ``[N]``; the
    ``index`` of a sample is its position in ``images`` (the .beton's index field). indices: the
    positions to train on (default all); batch_size: per rank. ``epoch(e, start_step)`` yields dicts
    of ``views`` (list of num_views float32 ``[B,3,S,S]``, normalised with ``mean``/``std``, fractions
    of 255), ``label`` and ``index`` (int64 ``[B]``), all on ``device``.

    The pixel work: fused (None: on the CPU) is the numba CPU kernel; otherwise batched torch ops on
    the device, eager or through ``torch.compile`` (``compile``: None = inductor on CUDA devices,
    falling back to eager with a logged warning if compilation fails; True or a backend name =
    compiled, a failure raises; False = eager). Every path draws the same parameters, so batches
    are identical across paths to float rounding (``pixels`` says which one runs).
    """

    def __init__(self, images: torch.Tensor, labels, *, batch_size: int, num_views: int, image_size: int,
                 recipe: "str | Recipe", seed: int, mean: Sequence[float], std: Sequence[float], device,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, indices=None, fused: bool | None = None,
                 compile: "bool | str | None" = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"resident images must be uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        for name, value, low in (("batch_size", batch_size, 1), ("num_views", num_views, 1), ("image_size", image_size, 1)):
            if int(value) < low:
                raise DataError(f"{name} must be >= {low}, got {value}")
        if not 0 <= int(rank) < int(world_size):
            raise DataError(f"rank must be in 0..{int(world_size) - 1}, got {rank}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = (labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))).to(self.device, torch.int64)
        if self.labels.shape != (images.shape[0],):
            raise DataError(f"resident labels must be [{images.shape[0]}], got {tuple(self.labels.shape)}")
        self.num_samples = int(images.shape[0])
        self.indices = None if indices is None else _ffcv._check_indices(indices, self.num_samples, "resident images").astype(np.int64)
        self.batch_size, self.num_views, self.image_size = int(batch_size), int(num_views), int(image_size)
        self.recipe = get_recipe(recipe)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.drop_last = bool(drop_last)
        explicit = compile is not None and compile is not False
        self.fused = (self.device.type == "cpu" and not explicit) if fused is None else bool(fused)
        if explicit and self.fused:
            raise DataError("compile applies to the batched torch augmentation: it needs fused=False")
        if compile is None:
            compile = self.device.type == "cuda" and not self.fused
            backend, strict = "inductor", False
        else:
            backend, strict = ("inductor" if compile is True else compile), True  # a backend name (or callable)
        self._pixels = CompiledPixels(backend, strict=strict) if compile else view_pixels
        if len(self) == 0:
            raise DataError(f"resident images: {self.num_samples} samples give no full batch of {self.batch_size} per rank "
                            f"({self.world_size} ranks, drop_last={self.drop_last})")

    @property
    def pixels(self) -> str:
        """The augmentation path in use: ``fused`` (numba, CPU), ``compiled`` or ``eager`` (torch ops on the device)."""
        if self.fused:
            return "fused"
        return "compiled" if isinstance(self._pixels, CompiledPixels) and self._pixels.error is None else "eager"

    @property
    def compile_error(self) -> str | None:
        """Why torch.compile fell back to eager (None: it did not, or was not asked for)."""
        return getattr(self._pixels, "error", None)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample positions for ``epoch``, int64 ``[n_rank]``, before batching."""
        n = self.num_samples if self.indices is None else len(self.indices)
        positions = sample_order(n, self.seed, epoch, self.rank, self.world_size)
        return positions if self.indices is None else self.indices[positions]

    def __len__(self) -> int:
        n_rank = len(self.order(0))
        return n_rank // self.batch_size if self.drop_last else -(-n_rank // self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        n_batches = len(self)
        if not 0 <= int(start_step) <= n_batches:
            raise DataError(f"start_step must be in 0..{n_batches}, got {start_step}")
        order = torch.from_numpy(self.order(epoch)).to(self.device)
        for step in range(int(start_step), n_batches):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            gen = generator_for(self.seed, int(epoch), step, self.rank)
            # compiled: the epoch's smaller last batch is padded to the batch size (one graph, no recompile)
            views = make_views(self.images, gen, self.recipe, self.image_size, self.num_views, self.mean, self.std,
                               index=index, fused=self.fused, pixels=self._pixels,
                               rows=self.batch_size if isinstance(self._pixels, CompiledPixels) else None)
            yield {"views": views, "label": self.labels.index_select(0, index), "index": index.clone()}


# ----------------------------------------------------------------------------- decoding and its cache


def cache_path(beton, meta: dict) -> Path:
    """Where the decoded copy of ``beton`` lives: beside it, keyed by the sidecar's sha256."""
    beton = Path(beton)
    digest = str(meta.get("sha256", "")).removeprefix("sha256:")[:16]
    if not digest:
        raise DataError(f"{_ffcv.meta_path(beton)} has no sha256: cannot key the decoded copy")
    side = f"-{int(meta['decode_size'])}" if meta.get("decode_size") else ""
    return beton.with_name(f"{beton.name}.decoded-{digest}{side}.npz")


def decoded_bytes(meta: dict) -> int | None:
    """Bytes of the decoded set (N x H x W x 3), or None for JPEG images of varying size with no decode size."""
    side = meta.get("decode_size")
    shape = meta.get("image_shape") or ([int(side)] * 2 if side else None)
    return None if shape is None else int(meta["num_samples"]) * int(shape[0]) * int(shape[1]) * 3


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast("B"))
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return "sha256:" + digest.hexdigest()


def _load_cached(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (images uint8 ``[n,H,W,3]``, labels int64 ``[n]``), or None when absent, unreadable or
    not matching the checksum written beside it."""
    try:
        expected = json.loads(path.with_name(path.name + ".json").read_text())["sha256"]
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):  # absent or damaged: decode again
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3 or labels.shape != (n,):
        return None
    return (images, labels) if _digest(images, labels) == expected else None


def decode_beton(beton, *, num_workers: int = 1, verify: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of ``beton``: (uint8 ``[N,H,W,3]``, int64 ``[N]``) in file order, through the cache.

    JPEG files decode to their sidecar's ``decode_size`` (as the streaming loader does). A cache hit
    reads no FFCV; a miss decodes the checked file with FFCV, writes the copy and its checksum
    atomically, and removes copies keyed by an older checksum.
    """
    meta = _ffcv._sidecar(beton) or _ffcv.open_beton(beton, "size")[0]  # open_beton explains a missing sidecar
    path = cache_path(beton, meta)
    cached = _load_cached(path, int(meta["num_samples"]))
    if cached is not None:
        return cached
    decoded = _ffcv.read_beton(beton, num_workers=num_workers, verify=verify)
    images, labels = decoded["image"], decoded["label"].astype(np.int64)
    for stale in path.parent.glob(f"{Path(beton).name}.decoded-*"):
        stale.unlink(missing_ok=True)
    atomic_write(path, lambda fh: np.savez(fh, images=images, labels=labels))
    atomic_write_json(path.with_name(path.name + ".json"), {"sha256": _digest(images, labels),
                                                             "beton_sha256": meta["sha256"], "shape": list(images.shape)})
    return images, labels


def resident_from_beton(beton, *, batch_size: int, num_views: int, image_size: int, recipe: "str | Recipe", seed: int,
                        distributed: bool, device, num_workers: int = 1, drop_last: bool = True, indices=None,
                        verify: str = "auto", compile: "bool | str | None" = None) -> ResidentLoader:
    """A :class:`ResidentLoader` over a .beton (decoded through the cache); rank and world from torch.distributed."""
    meta = _ffcv._sidecar(beton) or _ffcv.open_beton(beton, "size")[0]
    images, labels = decode_beton(beton, num_workers=num_workers, verify=verify)
    rank, world = _ffcv._rank(distributed)
    return ResidentLoader(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, batch_size=batch_size,
                          num_views=num_views, image_size=image_size, recipe=recipe, seed=seed, mean=meta["mean"],
                          std=meta["std"], device=device, rank=rank, world_size=world, drop_last=drop_last, indices=indices,
                          compile=compile)


# ----------------------------------------------------------------------------- the choice


def use_resident(resident: str, device, decoded: int | None, max_mb: float) -> bool:
    """``on``: always; ``off``: never; ``auto``: on a CUDA device when the decoded set (bytes) fits ``max_mb`` MiB."""
    if resident not in RESIDENT_CHOICES:
        raise DataError(f"data.resident must be one of {', '.join(RESIDENT_CHOICES)}, got {resident!r}")
    if resident != "auto":
        return resident == "on"
    return torch.device(device).type == "cuda" and decoded is not None and decoded <= max_mb * (1 << 20)


def ssl_loader(beton, *, batch_size: int, num_views: int, image_size: int, recipe: "str | Recipe", seed: int,
               distributed: bool, device, num_workers: int, drop_last: bool = True, indices=None, verify: str = "auto",
               fetch_timeout_s: float = _ffcv.DEFAULT_FETCH_TIMEOUT_S, batches_ahead: int = 2, decode_size: int | None = None,
               resident: str = DataConfig.resident, resident_max_mb: float = DataConfig.resident_max_mb,
               resident_compile: str = DataConfig.resident_compile):
    """The training loader for ``beton``: :class:`ResidentLoader` or the streaming ``SSLLoader``.

    Takes SSLLoader's arguments plus ``resident`` (auto, on, off; see :func:`use_resident`),
    ``resident_max_mb`` and ``resident_compile`` (auto, on, off: :class:`ResidentLoader`'s ``compile``
    None, True, False). Both loaders yield the same batches (see the module docstring).
    """
    meta = _ffcv._sidecar(beton) or _ffcv.open_beton(beton, "size")[0]
    # the resident copy is decoded at the file's own decode size; another one streams
    same_size = decode_size is None or decode_size == meta.get("decode_size")
    if resident == "on" and not same_size:
        raise DataError(f"data.resident on decodes {beton} at its own decode size {meta.get('decode_size')}, got decode_size {decode_size}")
    if same_size and use_resident(resident, device, decoded_bytes(meta), resident_max_mb):
        return resident_from_beton(beton, batch_size=batch_size, num_views=num_views, image_size=image_size, recipe=recipe,
                                   seed=seed, distributed=distributed, device=device, num_workers=num_workers,
                                   drop_last=drop_last, indices=indices, verify=verify,
                                   compile={"auto": None, "on": True, "off": False}[resident_compile])
    return _ffcv.SSLLoader(beton, batch_size=batch_size, num_views=num_views, image_size=image_size, recipe=recipe, seed=seed,
                           distributed=distributed, device=device, num_workers=num_workers, drop_last=drop_last,
                           indices=indices, verify=verify, fetch_timeout_s=fetch_timeout_s, batches_ahead=batches_ahead,
                           decode_size=decode_size)
