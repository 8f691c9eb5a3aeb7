"""From a DataConfig to a manifest (which images), to .beton files, to a cached PreparedDataset.

Three steps, each usable alone (the ``data_prep/`` entry points call the first two):

1. :func:`make_longtail_manifest` loads the source and decides every image of the train
   (LT or same-n balanced), test and probe sets; the manifest JSON records it all.
2. :func:`write_betons` reads a manifest, reloads the source (checking its checksum) and writes
   ``train.beton``, ``test.beton`` and ``probe.beton`` with their checksums into the manifest.
3. :func:`prepare_dataset` does both into ``data_cfg.cache_dir/<name>/``, built in a temporary
   folder and renamed, under a file lock, and returns at once when that folder exists.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltssl.io import atomic_write_text, file_sha256

from .errors import DataError
from .longtail import (
    balanced_counts,
    class_groups,
    compose_side_by_side,
    longtail_subset,
    permuted_pools,
    read_index_file,
    read_split_file,
    resolve_class_order,
    semi_synthetic_partners,
    take_prefixes,
)
from .sources import DATASETS, EMBEDDED, Source, load_source, missing_source, source_fingerprint

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ltssl-longtail-1"
SPLITS = ("train", "test", "probe")
# A configured data.imbalance_ratio agrees with a published split's n_max / n_min within 0.1 %:
# four significant digits (71.43 for 500 / 7) are enough to state it.
RATIO_RTOL = 1e-3
# Prepared .beton files this large are hashed once per (size, mtime, inode), remembered in
# VERIFIED_STAMPS; smaller ones are hashed on every check (a fraction of a second).
STAMP_MIN_BYTES = 256 << 20
VERIFIED_STAMPS = ".verified.json"


@dataclass
class PreparedDataset:
    """A prepared LT dataset: what the training job needs to build its loaders and weights.

    Paths are absolute. ``train_beton`` holds the training subset (LT or its same-n balanced
    counterpart) in manifest ``train`` order, ``test_beton`` the whole test set, ``probe_beton`` a
    balanced subset of the train pool for linear probes; each sample's ``index`` field is its
    position in its file. ``class_counts`` and ``groups`` index classes by id; ``ood`` is the
    out-of-domain dataset (``data.ood_dataset``) prepared the same way, or None.
    """

    root: Path
    train_beton: Path
    test_beton: Path
    probe_beton: Path
    manifest: dict
    num_classes: int
    class_counts: list[int]          # train images per class id
    groups: dict[str, list[int]]     # many / medium / few class ids (from the LT counts)
    n_train: int
    image_size: int
    ood: "PreparedDataset | None" = None


# ----------------------------------------------------------------------------- step 1: manifest


def _options(data_cfg: Any) -> dict:
    """The DataConfig fields that decide a dataset's content (JSON-ready)."""
    get = lambda k, d=None: getattr(data_cfg, k, d)  # noqa: E731
    return {
        "dataset": get("dataset"),
        "root": str(Path(get("root")).resolve()) if get("root") else None,
        "split_file": str(Path(get("split_file")).resolve()) if get("split_file") else None,
        "test_split_file": str(Path(get("test_split_file")).resolve()) if get("test_split_file") else None,
        # None (data_prep/make_longtail.py without --imbalance-ratio): a split file's own ratio
        "imbalance_ratio": None if get("imbalance_ratio") is None else float(get("imbalance_ratio")),
        "n_max": get("n_max"),
        "balanced": bool(get("balanced", False)),
        "class_order": list(get("class_order")) if get("class_order") is not None else None,
        "semi_synthetic": bool(get("semi_synthetic", False)),
        "image_size": int(get("image_size", 32)),
        "seed": int(get("seed", 0)),
        "probe_per_class": get("probe_per_class"),
    }


def check_options(opts: dict) -> None:
    """Cheap checks of a data configuration, before any loading (one-line DataError)."""
    if opts["dataset"] not in DATASETS:
        raise DataError(f"data.dataset must be one of {', '.join(DATASETS)}, got {opts['dataset']!r}")
    if opts["imbalance_ratio"] is None and not opts["split_file"]:
        raise DataError("data.imbalance_ratio must be given (>= 1) unless data.split_file decides it, got None")
    if opts["imbalance_ratio"] is not None and not opts["imbalance_ratio"] >= 1:
        raise DataError(f"data.imbalance_ratio must be >= 1, got {opts['imbalance_ratio']}")
    if opts["n_max"] is not None and int(opts["n_max"]) < 1:
        raise DataError(f"data.n_max must be >= 1, got {opts['n_max']}")
    if opts["probe_per_class"] is not None and int(opts["probe_per_class"]) < 1:
        raise DataError(f"data.probe_per_class must be >= 1, got {opts['probe_per_class']}")
    if opts["dataset"] not in EMBEDDED:
        if not opts["root"]:
            raise DataError(f"data.root must name the {opts['dataset']} source folder, got None")
        if not Path(opts["root"]).is_dir():
            raise missing_source(opts["dataset"], opts["root"])
    for key in ("split_file", "test_split_file"):
        if opts[key] and not Path(opts[key]).is_file():
            raise DataError(f"data.{key} {opts[key]} does not exist")
    if opts["split_file"] and opts["dataset"] == "digits":
        raise DataError("data.split_file is not supported for digits")
    if opts["split_file"] and opts["balanced"] and opts["dataset"] == "imagefolder":
        raise DataError("data.balanced needs a pool to draw from; an imagefolder split_file lists exactly the training images")
    if opts["split_file"] and opts["dataset"] == "imagefolder":
        # the list's labels alone decide the counts: refuse a contradicting ratio before any image is read
        _, labels = read_split_file(opts["split_file"])
        split_ratio(opts, np.bincount(labels).astype(int).tolist())


def check_data_config(data_cfg: Any) -> None:
    """:func:`check_options` of a DataConfig: the cheap checks a login node can run before submitting."""
    check_options(_options(data_cfg))


def split_ratio(opts: dict, counts: list[int]) -> float | None:
    """The realised n_max / n_min of a published split's per-class ``counts`` (None when a class has none).

    Raises DataError when ``opts["imbalance_ratio"]`` (data.imbalance_ratio; None = not given)
    contradicts it: the results' imbalance_ratio column must say what the split holds.
    """
    n_max, n_min = max(counts), min(counts)
    realised = n_max / n_min if n_min > 0 else None
    configured = opts["imbalance_ratio"]
    if configured is None or (realised is not None and abs(configured - realised) <= RATIO_RTOL * realised):
        return realised
    if realised is None:
        raise DataError(f"data.imbalance_ratio {configured:g} contradicts split file {opts['split_file']}: class "
                        f"{counts.index(0)} has no training image, so its n_max / n_min is unbounded")
    raise DataError(f"data.imbalance_ratio {configured:g} contradicts split file {opts['split_file']}, whose n_max / n_min "
                    f"is {n_max} / {n_min} = {realised:.4g}: set data.imbalance_ratio to {realised:.4g}")


def _is_index_file(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).split()
    return bool(head) and all(tok.isdigit() for tok in head[:-1] or head)


def _normalisation(source: Source) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (fractions of 255) of the whole train pool: identical for LT and balanced."""
    if source.train_images is None:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet statistics for image folders
    images = source.train_images
    total = np.zeros(3)
    total_sq = np.zeros(3)
    step = 2048  # chunks keep the float64 copies small (a whole-pool cast of CIFAR would take 1.2 GB)
    for start in range(0, len(images), step):
        chunk = images[start:start + step].reshape(-1, 3).astype(np.float64)
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count / 255.0
    std = np.sqrt(np.maximum(total_sq / count / 255.0**2 - mean**2, 1e-12))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


@dataclass
class _Selection:
    """The LT subset of the pool, its same-n balanced counterpart (None for an imagefolder split
    list: nothing to draw from) and the published split it came from (None when sampled)."""

    lt_idx: np.ndarray
    lt_counts: list[int]
    ratio: float | None              # data.imbalance_ratio (profile) or the split's n_max / n_min
    bal_idx: np.ndarray | None
    bal_counts: list[int] | None
    shared: list[int] | None
    n_max: int
    published: dict | None


def _split_list_selection(opts: dict, pool_labels: np.ndarray, C: int) -> _Selection:
    """imagefolder with a split file: the pool is exactly the listed images; no balanced counterpart."""
    lt_counts = _counts(pool_labels, C)
    return _Selection(np.arange(len(pool_labels)), lt_counts, split_ratio(opts, lt_counts), None, None, None,
                      max(lt_counts), {"kind": "split_list", "path": opts["split_file"]})


def _published_pool_selection(opts: dict, pool_labels: np.ndarray, C: int, order: list[int]) -> _Selection:
    """A published subset of a CIFAR pool (index list or 'index label' list) and its balanced counterpart."""
    path = opts["split_file"]
    if _is_index_file(path):
        lt_idx = np.sort(read_index_file(path, len(pool_labels)))
        published = {"kind": "index_list", "path": path}
    else:
        # a 'name label' list over a CIFAR pool: names are pool indices
        names, _ = read_split_file(path)
        if not all(n.isdigit() for n in names):
            raise DataError(f"split file {path}: {opts['dataset']} lists must name pool indices")
        lt_idx = np.sort(np.asarray([int(n) for n in names], dtype=np.int64))
        published = {"kind": "split_list", "path": path}
    if lt_idx.max() >= len(pool_labels):
        raise DataError(f"split file {path}: index {int(lt_idx.max())} out of range for a pool of {len(pool_labels)} images")
    lt_counts = _counts(pool_labels[lt_idx], C)
    bal_counts = balanced_counts(len(lt_idx), C, order)
    bal_idx = take_prefixes(permuted_pools(pool_labels, C, opts["seed"]), bal_counts, "the balanced subset")
    shared = [int(np.isin(lt_idx[pool_labels[lt_idx] == c], bal_idx).sum()) for c in range(C)]
    return _Selection(lt_idx, lt_counts, split_ratio(opts, lt_counts), bal_idx, bal_counts, shared, max(lt_counts),
                      published)


def _select(opts: dict, pool_labels: np.ndarray, C: int, order: list[int]) -> _Selection:
    """The LT subset: the published split when there is one, else the seeded exponential profile."""
    if opts["split_file"] and opts["dataset"] == "imagefolder":
        return _split_list_selection(opts, pool_labels, C)
    if opts["split_file"]:
        return _published_pool_selection(opts, pool_labels, C, order)
    sub = longtail_subset(pool_labels, C, opts["imbalance_ratio"], n_max=opts["n_max"], seed=opts["seed"], class_order=order)
    return _Selection(sub.indices, sub.counts, sub.imbalance_ratio, sub.balanced_indices, sub.balanced_counts,
                      sub.shared_per_class, sub.n_max, None)


def _probe_indices(opts: dict, pool_labels: np.ndarray, C: int) -> tuple[np.ndarray, int]:
    """The balanced probe subset (prefixes of the seeded class permutations) and its images per class."""
    pool_sizes = _counts(pool_labels, C)
    per_class = opts["probe_per_class"] or min(pool_sizes)
    if per_class > min(pool_sizes):
        raise DataError(f"data.probe_per_class {per_class} is larger than the smallest class holds ({min(pool_sizes)} images)")
    return take_prefixes(permuted_pools(pool_labels, C, opts["seed"]), [per_class] * C, "the probe subset"), per_class


def _source_section(source: Source) -> dict:
    return {
        "name": source.name,
        "root": source.root,
        "checksum": source.checksum,
        "pool_size": int(len(source.train_labels)),
        "test_size": int(len(source.test_labels)),
        "pool_class_counts": _counts(source.train_labels, source.num_classes),
    }


def _subset_sections(sel: _Selection) -> dict:
    """The manifest's longtail / balanced / pairing entries."""
    balanced = None if sel.bal_idx is None else {"counts": sel.bal_counts, "n": int(sum(sel.bal_counts)),
                                                 "indices": sel.bal_idx.tolist()}
    pairing = None if sel.bal_idx is None else {
        "rule": "per class, both subsets are prefixes of one seeded permutation of the class's pool images "
                "(PCG64, SeedSequence([seed, 1, class_id])); the balanced subset has the LT total, n // C per class, "
                "the remainder one each to the most frequent classes",
        "shared_per_class": sel.shared,
    }
    return {"longtail": {"counts": sel.lt_counts, "n": int(sum(sel.lt_counts)), "indices": sel.lt_idx.tolist()},
            "balanced": balanced, "pairing": pairing}


def _eval_sections(source: Source, probe_idx: np.ndarray, per_class: int) -> dict:
    """The manifest's test (the whole test set) and probe entries."""
    C = source.num_classes
    return {
        "test": {"counts": _counts(source.test_labels, C), "n": int(len(source.test_labels)),
                 "indices": list(range(len(source.test_labels))), "source_ids": list(source.test_ids)},
        "probe": {"counts": [per_class] * C, "n": int(per_class * C), "indices": probe_idx.tolist(),
                  "source_ids": [source.train_ids[i] for i in probe_idx]},
    }


def _semi_synthetic_section(opts: dict, source: Source, order: list[int], train_idx: np.ndarray) -> dict:
    """Liu et al. 2022 sec. 3.3 layout: which rare-class image each frequent-class train image carries."""
    half = (source.num_classes + 1) // 2
    frequent, rare = order[:half], order[half:]
    pool_labels = source.train_labels
    partners = semi_synthetic_partners(pool_labels[train_idx], train_idx, rare, pool_labels, opts["seed"])
    return {
        "rule": "Liu et al. ICLR 2022 sec. 3.3: train image = own image | rare-class image for frequent classes, "
                "own image | blank (zeros) for rare classes; test and probe images = own image | blank",
        "frequent_classes": list(frequent),
        "rare_classes": list(rare),
        "partners": partners.tolist(),   # per train-file position: pool position of the carried image, -1 = blank
        "partner_source_ids": [source.train_ids[p] if p >= 0 else None for p in partners],
    }


def make_longtail_manifest(data_cfg: Any, source: Source | None = None) -> dict:
    """Decide the train / test / probe images of ``data_cfg`` (a DataConfig or alike); return the manifest.

    Nothing is written. Raises DataError (one line) on bad input before loading anything big.
    """
    opts = _options(data_cfg)
    check_options(opts)
    if source is None:
        source = load_source(opts["dataset"], opts["root"], opts["split_file"] if opts["dataset"] == "imagefolder" else None,
                             opts["test_split_file"])
    C = source.num_classes
    order = resolve_class_order(C, opts["class_order"])
    sel = _select(opts, source.train_labels, C, order)
    if opts["balanced"]:
        train_idx, train_counts = sel.bal_idx, sel.bal_counts
    else:
        train_idx, train_counts = sel.lt_idx, sel.lt_counts
    probe_idx, per_class = _probe_indices(opts, source.train_labels, C)
    mean, std = _normalisation(source)
    scheme = source.group_scheme
    return {
        "format": MANIFEST_FORMAT,
        "config": opts,
        "source": _source_section(source),
        "num_classes": C,
        "class_order": order,
        "seed": opts["seed"],
        # the exponential profile's r, or a published split's realised n_max / n_min (None: a class has no image)
        "imbalance_ratio": sel.ratio,
        "n_max": int(sel.n_max),
        "n_min": int(min(sel.lt_counts)),
        "published_split": sel.published,
        **_subset_sections(sel),
        "train": {
            "subset": "balanced" if opts["balanced"] else "longtail",
            "counts": train_counts,
            "n": int(sum(train_counts)),
            "indices": np.asarray(train_idx).tolist(),          # pool positions, in train-file order
            "source_ids": [source.train_ids[i] for i in train_idx],
        },
        **_eval_sections(source, probe_idx, per_class),
        "groups": class_groups(sel.lt_counts, scheme),
        "group_scheme": scheme,
        "group_rule": ("thirds of the classes by LT count (sorted, ties by class id; larger parts first)" if scheme == "thirds"
                       else "many > 100, medium 20-100, few < 20 LT training images"),
        "normalization": {"mean": mean, "std": std, "rule": "per-channel statistics of the whole train pool"},
        "semi_synthetic": _semi_synthetic_section(opts, source, order, train_idx) if opts["semi_synthetic"] else None,
        "files": {},
    }


# ----------------------------------------------------------------------------- step 2: .beton files


def _load_source_for(manifest: dict) -> Source:
    opts = manifest["config"]
    source = load_source(opts["dataset"], manifest["source"]["root"] or opts["root"],
                         opts["split_file"] if opts["dataset"] == "imagefolder" else None, opts["test_split_file"])
    if source.checksum != manifest["source"]["checksum"]:
        raise DataError(
            f"{opts['dataset']} source at {source.root} changed since the manifest was made "
            f"(checksum {source.checksum[:20]}... vs {manifest['source']['checksum'][:20]}...)"
        )
    return source


def _split_images(manifest: dict, source: Source, split: str):
    """(get_image(i) -> uint8 [H,W,3], labels) of a split in file order."""
    part = manifest[split]
    idx = np.asarray(part["indices"], dtype=np.int64)
    pool_split = "test" if split == "test" else "train"
    labels = (source.test_labels if pool_split == "test" else source.train_labels)[idx]
    get = source.image_getter(pool_split)
    semi = manifest.get("semi_synthetic")
    if not semi:
        return (lambda i: get(int(idx[i]))), labels
    partners = np.asarray(semi["partners"], dtype=np.int64) if split == "train" else np.full(len(idx), -1)
    get_train = source.image_getter("train")

    def composite(i: int) -> np.ndarray:
        own = get(int(idx[i]))[None]
        other = get_train(int(partners[i]))[None] if partners[i] >= 0 else None
        return compose_side_by_side(own, other)[0]

    return composite, labels


def write_betons(out_dir: str | os.PathLike, *, num_workers: int = 1, source: Source | None = None) -> dict:
    """Write train/test/probe .beton files for the manifest in ``out_dir``; update the manifest.

    Raw pixels for in-memory sources (CIFAR, digits: exact); JPEG for image folders, resized to
    at most ``decode_size`` = round(image_size * 8 / 7) px (256 for 224). Returns the manifest.
    """
    out = Path(out_dir)
    mpath = out / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{out} holds no {MANIFEST} (make it with data_prep/make_longtail.py)")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise DataError(f"{mpath} is not valid JSON ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{mpath} is not an ltssl long-tail manifest (format {manifest.get('format')!r})")
    source = source or _load_source_for(manifest)
    # Deferred: .ffcv imports torch (seconds); the login-node checks import this module for the cheap steps.
    from .ffcv import write_beton

    norm = manifest["normalization"]
    image_size = int(manifest["config"]["image_size"])
    jpeg = not source.in_memory
    decode_size = int(round(image_size * 8 / 7)) if jpeg else None
    files = {}
    for split in SPLITS:
        if split == "probe" and manifest["probe"]["indices"] == manifest["train"]["indices"] and not manifest.get("semi_synthetic"):
            # same images (e.g. a balanced full pool): a hard link, not a second copy
            _link_beton(out / "train.beton", out / "probe.beton")
            files[split] = {**files["train"], "path": "probe.beton", "split": "probe", "linked_to": "train.beton"}
            continue
        get_image, labels = _split_images(manifest, source, split)
        meta = write_beton(
            out / f"{split}.beton", get_image, labels, num_classes=manifest["num_classes"], mean=norm["mean"],
            std=norm["std"], max_resolution=decode_size, num_workers=num_workers,
            extra_meta={"split": split, "decode_size": decode_size, "eval_size": image_size},
        )
        files[split] = {"path": f"{split}.beton", **meta}
    manifest["files"] = files
    manifest["complete"] = True
    atomic_write_text(mpath, json.dumps(manifest))
    return manifest


def _link_beton(src: Path, dst: Path) -> None:
    from .ffcv import meta_path  # deferred: .ffcv imports torch (see write_betons)

    dst.unlink(missing_ok=True)
    os.link(src, dst)
    meta = json.loads(meta_path(src).read_text())
    atomic_write_text(meta_path(dst), json.dumps({**meta, "split": dst.stem}, indent=1))


def write_manifest(manifest: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``manifest`` as ``out_dir/manifest.json`` atomically; creates ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps(manifest))
    return out / MANIFEST


# ----------------------------------------------------------------------------- step 3: cached preparation


def dataset_dir_name(data_cfg: Any) -> str:
    """Readable, unique name of a prepared dataset: the content-deciding options and the source identity."""
    opts = _options(data_cfg)
    ident = dict(opts)
    ident["source"] = source_fingerprint(opts["dataset"], opts["root"])
    for key in ("split_file", "test_split_file"):
        if opts[key] and Path(opts[key]).is_file():
            st = Path(opts[key]).stat()
            ident[key + "_stat"] = [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    ratio = "split" if opts["imbalance_ratio"] is None else f"{opts['imbalance_ratio']:g}"
    name = f"{opts['dataset']}-r{ratio}-n{opts['n_max'] or 'max'}-s{opts['seed']}"
    if opts["balanced"]:
        name += "-bal"
    if opts["semi_synthetic"]:
        name += "-semi"
    return f"{name}-{digest}"


def _from_dir(root: Path, manifest: dict, ood: PreparedDataset | None = None) -> PreparedDataset:
    train = root / "train.beton"
    return PreparedDataset(
        root=root,
        train_beton=train,
        test_beton=root / "test.beton",
        probe_beton=root / "probe.beton",
        manifest=manifest,
        num_classes=int(manifest["num_classes"]),
        class_counts=list(manifest["train"]["counts"]),
        groups={k: list(v) for k, v in manifest["groups"].items()},
        n_train=int(manifest["train"]["n"]),
        image_size=int(manifest["config"]["image_size"]),
        ood=ood,
    )


def _cached(root: Path) -> dict | None:
    """The manifest of a complete prepared folder (its files are checked by :func:`verify_prepared`), else None."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError:
        return None
    return manifest if manifest.get("complete") else None


def _load_stamps(root: Path) -> dict:
    try:
        stamps = json.loads((root / VERIFIED_STAMPS).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _save_stamps(root: Path, stamps: dict) -> None:
    try:
        atomic_write_text(root / VERIFIED_STAMPS, json.dumps(stamps))
    except OSError:
        pass  # a read-only shared cache: big files are hashed again next time, nothing else changes


def verify_prepared(root: Path, manifest: dict) -> None:
    """Check each .beton of a prepared folder against the size and sha256 its manifest records.

    Raises DataError naming the file (and how to rebuild) on a missing, truncated or corrupt
    file. Files of ``STAMP_MIN_BYTES`` or more are hashed once per (size, mtime, inode): the
    result is kept in ``root/.verified.json``, so each job of a sweep does not re-read gigabytes.
    """
    stamps = _load_stamps(root)
    fresh = dict(stamps)
    for split in SPLITS:
        info = manifest["files"].get(split) or {}
        f = root / info.get("path", f"{split}.beton")
        rebuild = f"delete {root} to rebuild it"
        if not f.is_file():
            raise DataError(f"{f} is missing from the prepared dataset: {rebuild}")
        st = f.stat()
        if st.st_size != info.get("size_bytes"):
            raise DataError(f"{f} is truncated or corrupt: {st.st_size} bytes, the manifest records {info.get('size_bytes')}; {rebuild}")
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, info.get("sha256")]
        if st.st_size >= STAMP_MIN_BYTES and stamps.get(f.name) == stamp:
            continue
        digest = file_sha256(f)
        if digest != info.get("sha256"):
            raise DataError(f"{f} is corrupt: sha256 {digest[7:19]}... differs from the manifest's "
                            f"{str(info.get('sha256'))[7:19]}...; {rebuild}")
        if st.st_size >= STAMP_MIN_BYTES:
            fresh[f.name] = stamp
    if fresh != stamps:
        _save_stamps(root, fresh)


def _build_cached(data_cfg: Any, cache_dir: Path) -> tuple[Path, dict]:
    """The prepared folder of ``data_cfg`` and its manifest: the cached one (verified), else built now."""
    name = dataset_dir_name(data_cfg)
    final = cache_dir / name
    manifest = _cached(final)
    if manifest is not None:
        verify_prepared(final, manifest)
        return final, manifest
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per dataset; the others wait, then read its result
        manifest = _cached(final)
        if manifest is not None:  # built by another process while this one waited
            verify_prepared(final, manifest)
            return final, manifest
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            manifest = make_longtail_manifest(data_cfg)
            write_manifest(manifest, tmp)
            manifest = write_betons(tmp, num_workers=max(1, int(getattr(data_cfg, "num_workers", 1))))
            if final.exists():  # an incomplete leftover of a crashed build
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, manifest


def _ood_config(data_cfg: Any) -> Any:
    """The OOD dataset: the whole balanced pool of ``ood_dataset`` (probe = train) and its test set."""
    fields = {f.name for f in dataclasses.fields(data_cfg)} if dataclasses.is_dataclass(data_cfg) else set()
    changes = dict(dataset=data_cfg.ood_dataset, root=data_cfg.ood_root, split_file=None, imbalance_ratio=1.0, n_max=None,
                   balanced=False, class_order=None, semi_synthetic=False, ood_dataset=None, ood_root=None)
    if "test_split_file" in fields:
        changes["test_split_file"] = None
    if "probe_per_class" in fields:
        changes["probe_per_class"] = None
    return dataclasses.replace(data_cfg, **changes)


def prepare_dataset(data_cfg: Any) -> PreparedDataset:
    """Build (once) and return the LT dataset of ``data_cfg`` under ``data_cfg.cache_dir``.

    Idempotent and cached: the folder name derives from every option that decides the content
    and from the source's identity (file sizes and mtimes), so a cached call only reads a manifest
    and checks the three files against the checksums it records (:func:`verify_prepared`; a
    truncated or corrupt file is a DataError naming it, before any training). Concurrent calls
    build once (file lock); a build is made in a temporary folder and renamed. Raises DataError
    (one line) on bad input before any work.
    """
    opts = _options(data_cfg)
    check_options(opts)
    if getattr(data_cfg, "ood_dataset", None):
        if data_cfg.ood_dataset not in DATASETS:
            raise DataError(f"data.ood_dataset must be one of {', '.join(DATASETS)}, got {data_cfg.ood_dataset!r}")
        if data_cfg.ood_dataset not in EMBEDDED and not data_cfg.ood_root:
            raise DataError(f"data.ood_root must name the {data_cfg.ood_dataset} source folder, got None")
        if data_cfg.ood_dataset not in EMBEDDED and not Path(data_cfg.ood_root).is_dir():
            raise missing_source(data_cfg.ood_dataset, Path(data_cfg.ood_root).resolve(), key="data.ood_root")
    cache_dir = Path(getattr(data_cfg, "cache_dir", "data")).resolve()
    root, manifest = _build_cached(data_cfg, cache_dir)
    ood = None
    if getattr(data_cfg, "ood_dataset", None):
        ood = prepare_dataset(_ood_config(data_cfg))
    return _from_dir(root, manifest, ood)
