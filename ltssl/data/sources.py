"""Labelled image sources: CIFAR-10/100 "python version" folders, scikit-learn digits, image folders.

A :class:`Source` is a train pool (what LT subsets are drawn from) and a test set, with a
checksum that identifies the source's content in manifests.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .errors import DataError
from .longtail import STREAM_POOL_SPLIT, make_rng, read_split_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
DIGITS_TEST_PER_CLASS = 50   # balanced digits test set: 500 images; the rest (124-133 per class) is the pool
DIGITS_SPLIT_SEED = 0        # fixed, not data.seed: every trial evaluates on the same digits test set
DIGITS_SIZE = 32
EMBEDDED = ("digits", "digits_ood")  # shipped with scikit-learn: no source folder
DATASETS = (*EMBEDDED, "cifar10", "cifar100", "imagefolder")


@dataclass
class Source:
    """A train pool and a test set of one dataset.

    In-memory sources hold uint8 images [N,H,W,3]; image folders hold paths (read when written).
    ``train_ids`` / ``test_ids`` name each image in the original source (CIFAR index, digits index,
    relative path) so manifests can reproduce a subset anywhere.
    """

    name: str
    root: str | None
    num_classes: int
    train_labels: np.ndarray
    test_labels: np.ndarray
    train_ids: list
    test_ids: list
    checksum: str
    group_scheme: str = "thirds"
    train_images: np.ndarray | None = None
    test_images: np.ndarray | None = None
    train_paths: list[str] | None = None
    test_paths: list[str] | None = None
    class_names: list[str] = field(default_factory=list)

    @property
    def in_memory(self) -> bool:
        return self.train_images is not None

    def image_getter(self, split: str) -> Callable[[int], np.ndarray]:
        """pool position -> uint8 [H,W,3] for ``split`` in {"train", "test"}."""
        images = self.train_images if split == "train" else self.test_images
        if images is not None:
            return lambda i: images[i]
        paths = self.train_paths if split == "train" else self.test_paths
        return lambda i: read_image(paths[i])


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 RGB [H,W,3]; DataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


# ----------------------------------------------------------------------------- CIFAR

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
IMAGEFOLDER_LAYOUT = ("root/train/<class>/<image>.jpg and root/val/<class>/<image>.jpg (or root/test), "
                      "or data.split_file / data.test_split_file listing 'relative/path label' lines under root")


def source_hint(name: str, root: str | os.PathLike | None) -> str:
    """How to get the source of dataset ``name`` where ``root`` points (one sentence, no newline).

    CIFAR: the archive from the CIFAR page and the folder it unpacks to (data.root may name that
    folder or its parent); image folders: the expected layout. Empty for embedded datasets.
    """
    if name in CIFAR_LAYOUT:
        sub, archive = CIFAR_LAYOUT[name][0], CIFAR_ARCHIVES[name]
        root_p = Path(root) if root else Path("data") / sub
        parent = root_p.parent if root_p.name == sub else root_p
        return (f"get {archive} from {CIFAR_PAGE} (on the login node: curl -LO {CIFAR_PAGE.rsplit('/', 1)[0]}/{archive}) "
                f"and unpack it with 'mkdir -p {parent} && tar xzf {archive} -C {parent}', which makes {parent / sub}")
    if name == "imagefolder":
        return f"expected layout: {IMAGEFOLDER_LAYOUT}"
    return ""


def missing_source(name: str, root: str | os.PathLike, key: str = "data.root") -> DataError:
    """The one-line error for a source folder ``root`` (config field ``key``) that is not there, with how to get it."""
    hint = source_hint(name, root)
    return DataError(f"{key} {root} does not exist" + (f": {hint}" if hint else ""))


def cifar_folder(name: str, root: str | os.PathLike | None) -> Path:
    """The folder holding the CIFAR pickles: ``root`` itself or its standard sub-folder."""
    sub, train_files, _, _, _ = CIFAR_LAYOUT[name]
    if not root:
        raise DataError(f"data.root must name the {name} source folder, got None")
    root = Path(root)
    if not root.is_dir():
        raise missing_source(name, root)
    for cand in (root, root / sub):
        if (cand / train_files[0]).is_file():
            return cand
    raise DataError(f"{name} source folder {root} holds no {train_files[0]} (expected the CIFAR 'python version' layout; "
                    f"{source_hint(name, root)})")


def _unpickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            # The originals were pickled by Python 2: bytes keys with encoding='bytes'.
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(f"{path} is not a CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR pickle (holds a {type(batch).__name__}, not a dict)")
    batch = {(k.encode() if isinstance(k, str) else k): v for k, v in batch.items()}
    if b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} lacks the keys data and {label_key.decode()}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(labels):
        raise DataError(f"{path}: data must be uint8 N x 3072 with one label per row, got {data.dtype} {data.shape} and {len(labels)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _files_checksum(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def load_cifar(name: str, root: str | os.PathLike | None) -> Source:
    """CIFAR-10 or CIFAR-100 from the standard "python version" folder (50k train pool, 10k test)."""
    if name not in CIFAR_LAYOUT:
        raise DataError(f"unknown CIFAR dataset {name!r} (cifar10, cifar100)")
    folder = cifar_folder(name, root)
    _, train_files, test_files, label_key, num_classes = CIFAR_LAYOUT[name]
    paths = []
    for fname in train_files + test_files:
        if not (folder / fname).is_file():
            raise DataError(f"{name} source folder {folder} lacks {fname}")
        paths.append(folder / fname)
    parts = [_unpickle(p, label_key) for p in paths]
    n_train = len(train_files)
    train_images = np.concatenate([p[0] for p in parts[:n_train]])
    train_labels = np.concatenate([p[1] for p in parts[:n_train]])
    test_images = np.concatenate([p[0] for p in parts[n_train:]])
    test_labels = np.concatenate([p[1] for p in parts[n_train:]])
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
            raise DataError(f"{name} {split} label {bad} out of range 0..{num_classes - 1} in {folder}")
    return Source(
        name=name,
        root=str(folder.resolve()),
        num_classes=num_classes,
        train_labels=train_labels,
        test_labels=test_labels,
        train_ids=list(range(len(train_labels))),
        test_ids=list(range(len(test_labels))),
        checksum=_files_checksum(paths),
        train_images=train_images,
        test_images=test_images,
    )


# ----------------------------------------------------------------------------- digits


def load_digits_source() -> Source:
    """scikit-learn's digits (1,797 real 8x8 images, 10 classes), upsampled to 32 px RGB.

    Bilinear upsampling (torch ``interpolate``, align_corners False) of the 0-16 grey levels scaled
    to 0-255, repeated over 3 channels. A fixed seeded split gives a balanced test set of
    ``DIGITS_TEST_PER_CLASS`` per class; the rest is the train pool LT subsets come from.
    """
    # Deferred: torch and scikit-learn take seconds to import, and the login-node checks import
    # this module only for folder and split-file checks.
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = F.interpolate(grey, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = big.clamp(0, 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous().numpy()
    labels = digits.target.astype(np.int64)
    test_pos, pool_pos = [], []
    for c in range(10):
        members = make_rng(DIGITS_SPLIT_SEED, STREAM_POOL_SPLIT, c).permutation(np.flatnonzero(labels == c))
        test_pos.append(members[:DIGITS_TEST_PER_CLASS])
        pool_pos.append(members[DIGITS_TEST_PER_CLASS:])
    test_idx = np.sort(np.concatenate(test_pos))
    pool_idx = np.sort(np.concatenate(pool_pos))
    digest = hashlib.sha256(digits.images.astype(np.float64).tobytes() + labels.tobytes()).hexdigest()
    return Source(
        name="digits",
        root=None,
        num_classes=10,
        train_labels=labels[pool_idx],
        test_labels=labels[test_idx],
        train_ids=pool_idx.tolist(),
        test_ids=test_idx.tolist(),
        checksum="sha256:" + digest,
        train_images=images[pool_idx],
        test_images=images[test_idx],
    )


def load_digits_ood_source() -> Source:
    """Out-of-domain partner of digits (``data.ood_dataset: digits_ood``): the same split, shifted.

    scikit-learn ships no second labelled image dataset, so the digits' OOD probe is a fixed
    domain shift none of the SSL augmentations produces: every image intensity-inverted (white
    background, 255 - x) and rotated by 90 degrees counter-clockwise. Same classes, same
    train pool / test split as ``digits``; its own normalisation statistics.
    """
    base = load_digits_source()

    def shift(images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(255 - np.rot90(images, k=1, axes=(1, 2)))

    return Source(
        name="digits_ood", root=None, num_classes=base.num_classes, train_labels=base.train_labels,
        test_labels=base.test_labels, train_ids=base.train_ids, test_ids=base.test_ids,
        checksum=base.checksum + ":inverted-rot90", train_images=shift(base.train_images),
        test_images=shift(base.test_images),
    )


# ----------------------------------------------------------------------------- image folders


def _list_class_folders(folder: Path) -> tuple[list[str], list[str], list[int]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {folder} holds no class sub-folders (expected root/class/image.jpg)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                paths.append(str(f))
                labels.append(label)
    if not paths:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, paths, labels


def _listing_checksum(paths: list[str], labels) -> str:
    # Content hashing ImageNet-scale data would take minutes; names, sizes and labels identify it.
    digest = hashlib.sha256()
    for p, y in zip(paths, labels):
        digest.update(f"{p}\t{os.path.getsize(p)}\t{int(y)}\n".encode())
    return "sha256-listing:" + digest.hexdigest()


def load_imagefolder(root: str | os.PathLike | None, split_file: str | None = None, test_split_file: str | None = None) -> Source:
    """An ImageNet-scale source: ``root/train/<class>/*.jpg`` and ``root/val`` (or ``root/test``),
    or published split files (``relative/path label`` lines, paths relative to ``root``).

    With ``split_file`` the train pool is exactly the listed images (ImageNet-LT / Places-LT);
    ``test_split_file`` lists the test set (default: ``root/val`` or ``root/test`` folders).
    """
    if not root:
        raise DataError("data.root must name the imagefolder source folder, got None")
    root_p = Path(root)
    if not root_p.is_dir():
        raise missing_source("imagefolder", root_p)
    class_names: list[str] = []

    def from_split(fname: str) -> tuple[list[str], np.ndarray]:
        rel, labels = read_split_file(fname)
        paths = [str(root_p / r) for r in rel]
        for r, p in zip(rel, paths):
            if not os.path.isfile(p):
                raise DataError(f"split file {fname} lists {r}, which is not under {root_p}")
        return paths, labels

    if split_file:
        train_paths, train_labels = from_split(split_file)
    else:
        train_dir = root_p / "train"
        if not train_dir.is_dir():
            raise DataError(f"imagefolder source folder {root_p} has no train/ sub-folder ({source_hint('imagefolder', root_p)})")
        class_names, train_paths, tl = _list_class_folders(train_dir)
        train_labels = np.asarray(tl, dtype=np.int64)
    if test_split_file:
        test_paths, test_labels = from_split(test_split_file)
    else:
        test_dir = next((root_p / d for d in ("val", "test") if (root_p / d).is_dir()), None)
        if test_dir is None:
            raise DataError(f"imagefolder source folder {root_p} has no val/ or test/ sub-folder and no test split file")
        test_classes, test_paths, tl = _list_class_folders(test_dir)
        if class_names and test_classes != class_names:
            raise DataError(f"imagefolder {test_dir} classes differ from {root_p / 'train'}")
        test_labels = np.asarray(tl, dtype=np.int64)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return Source(
        name="imagefolder",
        root=str(root_p.resolve()),
        num_classes=num_classes,
        train_labels=train_labels,
        test_labels=test_labels,
        train_ids=[os.path.relpath(p, root_p) for p in train_paths],
        test_ids=[os.path.relpath(p, root_p) for p in test_paths],
        checksum=_listing_checksum(train_paths + test_paths, list(train_labels) + list(test_labels)),
        group_scheme="imagenet",
        train_paths=train_paths,
        test_paths=test_paths,
        class_names=class_names,
    )


def load_source(name: str, root: str | None = None, split_file: str | None = None, test_split_file: str | None = None) -> Source:
    """Dispatch on the dataset name (data.dataset)."""
    if name == "digits":
        return load_digits_source()
    if name == "digits_ood":
        return load_digits_ood_source()
    if name in CIFAR_LAYOUT:
        return load_cifar(name, root)
    if name == "imagefolder":
        return load_imagefolder(root, split_file, test_split_file)
    raise DataError(f"data.dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def source_fingerprint(name: str, root: str | None) -> str:
    """A cheap identity of a source (file names, sizes, mtimes) for cache keys; no content hashing."""
    if name in EMBEDDED or not root:
        return name
    root_p = Path(root)
    if not root_p.exists():
        raise missing_source(name, root_p)
    parts = [str(root_p.resolve())]
    if name in CIFAR_LAYOUT:
        folder = cifar_folder(name, root)
        for p in sorted(folder.iterdir()):
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    else:
        st = root_p.stat()
        parts.append(f"{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
