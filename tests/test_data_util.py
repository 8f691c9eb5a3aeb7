"""Helpers shared by the data tests (tiny CIFAR-format folders written as the originals are) and their check."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from ltssl.data.sources import load_cifar


def cifar_images(n: int, seed: int) -> np.ndarray:
    """uint8 [n,32,32,3] with structure (smooth gradients + noise), so crops and colours differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = rng.uniform(0, 1, (n, 1, 1, 3)) * yy[None, :, :, None] + rng.uniform(0, 1, (n, 1, 1, 3)) * xx[None, :, :, None]
    noise = rng.normal(0, 0.1, (n, 32, 32, 3))
    return (np.clip(base / 2 + 0.25 + noise, 0, 1) * 255).astype(np.uint8)


def _dump(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    # As the originals: a dict with bytes keys pickled for Python 2 (protocol 2); data is N x 3072 (R, G, B planes).
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"tiny batch", label_key: [int(y) for y in labels], b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def write_cifar(root: Path, name: str = "cifar10", per_class_train: int = 30, per_class_test: int = 10, seed: int = 0) -> Path:
    """A tiny CIFAR 'python version' folder under ``root``; returns ``root`` (the parent of the standard folder)."""
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), per_class_train))
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), per_class_test))
    train = cifar_images(len(train_labels), seed + 1)
    test = cifar_images(len(test_labels), seed + 2)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, chunk in enumerate(np.array_split(np.arange(len(train_labels)), 5), 1):
            _dump(folder / f"data_batch_{i}", train[chunk], train_labels[chunk], b"labels")
        _dump(folder / "test_batch", test, test_labels, b"labels")
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump(folder / "train", train, train_labels, b"fine_labels")
        _dump(folder / "test", test, test_labels, b"fine_labels")
    return root


def write_image_folder(root: Path, per_class: list[int], test_per_class: int = 2, size=(40, 48), seed: int = 0) -> Path:
    """root/train/cXX/*.png and root/val/cXX/*.png with random images of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", per_class), ("val", [test_per_class] * len(per_class))):
        for c, n in enumerate(counts):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def test_tiny_cifar_reads_back_exactly(tmp_path):
    write_cifar(tmp_path, "cifar10", per_class_train=3, per_class_test=1)
    src = load_cifar("cifar10", tmp_path)
    assert src.train_images.shape == (30, 32, 32, 3) and src.test_images.shape == (10, 32, 32, 3)
    expected = cifar_images(30, 1)
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 3))
    order = np.concatenate(np.array_split(np.arange(30), 5))
    assert np.array_equal(src.train_images, expected[order]) and np.array_equal(src.train_labels, labels[order])
    src100 = load_cifar("cifar100", write_cifar(tmp_path / "c100", "cifar100", per_class_train=2, per_class_test=1))
    assert src100.num_classes == 100 and len(src100.train_labels) == 200
