"""The torchvision reference pipeline: a map-style Dataset with per-image transforms + DataLoader.

It applies the recipes of :mod:`ltssl.data.augment` the classic way (SimSiam / MoCo code: PIL
images, ``torchvision.transforms``, one image at a time in DataLoader worker processes). It is
what ``benchmarks/loader.py`` compares FFCV against, and the check that both pipelines produce
the same kind of views (shapes, dtypes, value ranges, label alignment).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .augment import Recipe, get_recipe
from .errors import DataError


def build_transform(recipe: Recipe, image_size: int, mean: Sequence[float], std: Sequence[float], *, aspect: float = 1.0,
                    backend: str = "pil"):
    """torchvision Compose of ``recipe`` for one image (PIL image or uint8 CHW tensor) -> float [3,S,S].

    aspect: W/H of the source; the crop's ratio range is relative to it (1 for square images).
    """
    ratio = (recipe.crop_ratio[0] * aspect, recipe.crop_ratio[1] * aspect)
    ops = [
        T.RandomResizedCrop(image_size, scale=recipe.crop_scale, ratio=ratio, antialias=True),
        T.RandomHorizontalFlip(recipe.flip_p),
    ]
    if recipe.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*recipe.jitter)], p=recipe.jitter_p))
    if recipe.gray_p > 0:
        ops.append(T.RandomGrayscale(recipe.gray_p))
    if recipe.blur_p > 0:
        k = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=recipe.blur_sigma)], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=recipe.solarize_p))  # uint8 threshold: half the range
    if backend == "pil":
        ops.append(T.ToTensor())
    elif backend == "tensor":
        ops.append(T.ConvertImageDtype(torch.float32))
    else:
        raise DataError(f"reference backend must be pil or tensor, got {backend!r}")
    ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


class ReferenceDataset(Dataset):
    """In-memory images uint8 [N,H,W,3] + labels -> (list of num_views views [3,S,S], label, index)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], *, num_views: int, image_size: int, recipe: "str | Recipe",
                 mean: Sequence[float], std: Sequence[float], backend: str = "pil"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(f"reference images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_views = int(num_views)
        self.backend = backend
        aspect = images.shape[2] / images.shape[1]
        self.transform = build_transform(get_recipe(recipe), image_size, mean, std, aspect=aspect, backend=backend)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.backend == "pil":
            img = Image.fromarray(self.images[i])
        else:
            img = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return [self.transform(img) for _ in range(self.num_views)], int(self.labels[i]), int(i)


def _collate(batch):
    views, labels, index = zip(*batch)
    return {
        "views": [torch.stack([v[k] for v in views]) for k in range(len(views[0]))],
        "label": torch.tensor(labels, dtype=torch.int64),
        "index": torch.tensor(index, dtype=torch.int64),
    }


def reference_loader(images: np.ndarray, labels: Sequence[int], *, batch_size: int, num_views: int, image_size: int,
                     recipe: "str | Recipe", mean: Sequence[float], std: Sequence[float], seed: int = 0, num_workers: int = 2,
                     drop_last: bool = True, backend: str = "pil") -> DataLoader:
    """A shuffling DataLoader over :class:`ReferenceDataset` yielding the SSLLoader's batch dicts (on CPU)."""
    ds = ReferenceDataset(images, labels, num_views=num_views, image_size=image_size, recipe=recipe, mean=mean, std=std,
                          backend=backend)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=drop_last, num_workers=num_workers,
                      collate_fn=_collate, generator=gen, persistent_workers=num_workers > 0)
