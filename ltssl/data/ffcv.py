"""FFCV .beton files (atomic writes, own checksums) and the SSL / evaluation loaders.

File layout: fields ``image`` (RGBImageField: raw for sides <= 64 px, else JPEG with a
maximum resolution), ``label`` (IntField) and ``index`` (IntField, the sample's position in the
file, which keys per-sample weights and pseudo-labels). Beside ``x.beton`` lies ``x.beton.json``
(see :func:`meta_path`): sample count, size in bytes, sha256, number of classes, image shape and
the normalisation the loaders use. FFCV 1.0.2 has no checksums and no bounds checks, so both are
done here, before any Loader is built.

Loaders decode each image once (FFCV, numba threads) and build every view from the decoded
batch with :mod:`ltssl.data.augment` on batched tensors on the target device, drawing all
random parameters from a generator seeded by ``(seed, epoch, step, rank)``. The sample order is
FFCV's RANDOM order seeded by ``(seed, epoch)`` (torch's DistributedSampler order when
distributed). So ``epoch(e, start_step=k)`` yields exactly batches k, k+1, ... of an
uninterrupted epoch e, which is what a resumed job needs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from ctypes import c_uint64
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ltssl.io import atomic_write_text, file_sha256

from .augment import Recipe, eval_transform, generator_for, get_recipe, make_views
from .errors import DataError

RAW_MAX_SIDE = 64                  # raw pixels up to this side, JPEG above (FFCV notes: 10x smaller at 64 px)
PAGE_SIZE = 1 << 21                # FFCV's minimum: small files for small datasets (one page per writer at least)
DEFAULT_FETCH_TIMEOUT_S = 300.0    # first batch pays numba compilation (2-11 s here); a hang is far longer
VERIFY_FULL_MAX_BYTES = 2 << 30    # verify="auto": full sha256 up to 2 GiB, size + header above
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIELDS = ("image", "label", "index")


def _import_ffcv():
    """Import ffcv without its side effect: ``import ffcv`` sets torch's thread count to 1.

    Every ``from ffcv ...`` import in this module is deferred to after this call: importing ffcv
    costs seconds (numba), and sidecar-only users (``read_labels``'s callers, prepare's checks)
    and machines without FFCV must not pay for it.
    """
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        from ffcv import fields, loader, writer  # noqa: F401
        from ffcv.memory_managers.os_cache import OSCacheManager
    finally:
        torch.set_num_threads(threads)
    OSCacheManager.compile_reader = _os_cache_compile_reader
    return ffcv


def _os_cache_compile_reader(self):
    """FFCV 1.0.2's ``OSCacheManager.compile_reader`` without its side effect on numba's types.

    FFCV's version builds its state type with ``t1 = numba.uint8[::1]; t1.mutable = False``:
    numba interns types, so this turns the one shared ``array(uint8, 1d, C)`` object read-only
    in place and changes its hash while it is a key in numba's caches (the decoders' compiled
    overloads among them). When such a dispatcher is garbage-collected, numba's finalizer can no
    longer look its overload keys up and prints ``KeyError: (Array(uint8, 1, 'C', True, ...), ...)``
    (in pytest: PytestUnraisableExceptionWarning). Same reader, same types (a read-only uint8
    array in, out), but a read-only type of its own instead of the mutated shared one.
    """
    import numba  # deferred with ffcv (see _import_ffcv); numba is imported by then
    from ffcv.pipeline.compiler import Compiler

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    data = numba.types.Array(numba.uint8, 1, "C", readonly=True)
    pointers = numba.uint64[::1]
    return Compiler.compile(read, data(numba.uint64, numba.types.Tuple([data, pointers, pointers])))


def meta_path(beton: str | os.PathLike) -> Path:
    """The sidecar JSON of a .beton file: ``<file>.json``."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".json")


# ----------------------------------------------------------------------------- writing


class _IndexedSamples:
    """The indexable dataset FFCV's writer reads: position -> (uint8 [H,W,3], label, position)."""

    def __init__(self, get_image: Callable[[int], np.ndarray], labels: np.ndarray):
        self.get_image = get_image
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = np.ascontiguousarray(self.get_image(int(i)), dtype=np.uint8)
        return image, int(self.labels[i]), int(i)


def _guarded_worker(work_fn, errors, *args) -> None:
    """Run an FFCV writer worker; on failure leave a one-line reason for the parent, exit 1."""
    try:
        work_fn(*args)
    except BaseException as exc:  # noqa: BLE001 - reported by the parent process
        errors.put(str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}")
        raise SystemExit(1)


def _make_writer_class():
    _import_ffcv()
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset

    class SafeDatasetWriter(DatasetWriter):
        """FFCV's writer with fork workers, no progress bar, and a failure instead of a hang.

        FFCV 1.0.2 waits for the sample counter forever when a worker process dies (a bad image,
        out of memory); here a dead worker raises DataError.
        """

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            ctx = multiprocessing.get_context("fork")
            self.num_samples = num_samples
            self.prepare()
            workqueue = ctx.Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            allocations_queue = ctx.Queue()
            done_number = ctx.Value(c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done_number,
                    allocations_queue, *extra_worker_args)
            errors = ctx.Queue()
            procs = [ctx.Process(target=_guarded_worker, args=(work_fn, errors, *args), daemon=True)
                     for _ in range(self.num_workers)]
            for p in procs:
                p.start()
            allocation_list = []
            try:
                got = 0
                while got < len(procs):
                    try:
                        allocation_list.extend(allocations_queue.get(timeout=0.2))
                        got += 1
                    except queue.Empty:
                        dead = [p for p in procs if p.exitcode not in (None, 0)]
                        if dead:
                            try:
                                reason = errors.get(timeout=0.5)
                            except queue.Empty:
                                reason = f"a writer process exited with code {dead[0].exitcode}"
                            raise DataError(f"writing {self.fname} failed: {reason}")
                if done_number.value != num_samples:
                    raise DataError(f"writing {self.fname} failed: {done_number.value} of {num_samples} samples written")
                for p in procs:
                    p.join()
                self.finalize(allocation_list)
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SafeDatasetWriter, worker_job_indexed_dataset


def _check_write_inputs(path: Path, get_image, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Refuse an empty set, labels out of range, or images that are not uint8 [H,W,3]; return image 0."""
    if len(labels) == 0:
        raise DataError(f"cannot write {path}: no images")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"cannot write {path}: label {bad} out of range 0..{num_classes - 1}")
    first = np.asarray(get_image(0))
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise DataError(f"cannot write {path}: images must be uint8 [H,W,3], got {first.dtype} {first.shape}")
    return first


def _write_ffcv_file(tmp: Path, samples: _IndexedSamples, raw: bool, max_resolution: int | None, jpeg_quality: int,
                     num_workers: int) -> None:
    """FFCV's writer over ``samples`` into ``tmp``, fsynced: fields image (raw or JPEG), label, index."""
    SafeDatasetWriter, _ = _make_writer_class()
    from ffcv.fields import IntField, RGBImageField  # after _make_writer_class imported ffcv

    image_field = RGBImageField(write_mode="raw") if raw else RGBImageField(
        write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality
    )
    writer = SafeDatasetWriter(str(tmp), {"image": image_field, "label": IntField(), "index": IntField()},
                               page_size=PAGE_SIZE, num_workers=max(1, int(num_workers)))
    writer.from_indexed_dataset(samples, chunksize=256)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())


def write_beton(
    path: str | os.PathLike,
    get_image: Callable[[int], np.ndarray],
    labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    num_workers: int = 1,
    extra_meta: dict | None = None,
) -> dict:
    """Write images ``get_image(0..n-1)`` (uint8 [H,W,3]) with their labels to ``path``, atomically.

    Images whose longer side is <= 64 px (and no ``max_resolution``) are stored raw (exact);
    otherwise JPEG (quality ``jpeg_quality``) resized to at most ``max_resolution`` px. The file is
    written under a temporary name, fsynced, checksummed and renamed; then the sidecar
    ``<path>.json`` (:func:`meta_path`) is written atomically. A crash leaves no file at ``path``
    (or the previous complete one). Returns the sidecar dict.
    mean, std: per-channel normalisation (fractions of 255) the loaders apply.
    """
    path = Path(path)
    labels = np.asarray(labels, dtype=np.int64)
    first = _check_write_inputs(path, get_image, labels, num_classes)
    raw = max_resolution is None and max(first.shape[:2]) <= RAW_MAX_SIDE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        _write_ffcv_file(tmp, _IndexedSamples(get_image, labels), raw, max_resolution, jpeg_quality, num_workers)
        meta = {
            "format": "ltssl-beton-1",
            "fields": list(FIELDS),
            "num_samples": int(len(labels)),
            "num_classes": int(num_classes),
            "class_counts": np.bincount(labels, minlength=num_classes).astype(int).tolist(),
            "image_mode": "raw" if raw else "jpg",
            "image_shape": [int(first.shape[0]), int(first.shape[1])] if raw else None,  # [H, W]; None for JPEG
            "max_resolution": max_resolution,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "size_bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
            **(extra_meta or {}),
        }
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(meta_path(path), json.dumps(meta, indent=1))
    return meta


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- checking

def open_beton(beton: str | os.PathLike, verify: str = "auto") -> tuple[dict, object]:
    """Check a .beton file and return (sidecar meta, ffcv Reader).

    verify: "full" (sha256 of the file), "size" (size + FFCV header), "auto" (full up to 2 GiB).
    Raises DataError on a missing file or sidecar, a size or checksum mismatch, an FFCV header
    that does not parse, missing fields, labels out of range or index values that are not
    0..n-1. The checksum is remembered per (path, size, mtime, inode) in this process
    (:func:`ltssl.io.file_sha256`), so the loaders of a prepared dataset do not hash it again.
    """
    beton = Path(beton)
    if not beton.is_file():
        raise DataError(f"{beton} does not exist")
    mp = meta_path(beton)
    if not mp.is_file():
        raise DataError(f"{beton} has no {mp.name}: it was not written by ltssl.data.ffcv.write_beton or its write did not finish")
    try:
        meta = json.loads(mp.read_text())
        expected_size = int(meta["size_bytes"])
        num_classes = int(meta["num_classes"])
        n = int(meta["num_samples"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{mp} is not a valid beton sidecar ({type(exc).__name__}: {exc})") from None
    st = beton.stat()
    if st.st_size != expected_size:
        raise DataError(f"{beton} is truncated or corrupt: {st.st_size} bytes, expected {expected_size}")
    if verify not in ("full", "size", "auto"):
        raise DataError(f"verify must be full, size or auto, got {verify!r}")
    full = verify == "full" or (verify == "auto" and st.st_size <= VERIFY_FULL_MAX_BYTES)
    if full:
        digest = file_sha256(beton)
        if digest != meta.get("sha256"):
            raise DataError(f"{beton} is corrupt: sha256 {digest[7:19]}... differs from its sidecar's {str(meta.get('sha256'))[7:19]}...")
    _import_ffcv()
    from ffcv.reader import Reader

    try:
        reader = Reader(str(beton))
    except Exception as exc:  # noqa: BLE001 - FFCV raises assorted errors on damaged headers
        raise DataError(f"{beton} is corrupt: FFCV cannot read it ({type(exc).__name__}: {exc})") from None
    if int(reader.num_samples) != n:
        raise DataError(f"{beton} is corrupt: {reader.num_samples} samples in the header, {n} in {mp.name}")
    missing = [f for f in FIELDS if f not in reader.field_names]
    if missing:
        raise DataError(f"{beton} lacks the fields {', '.join(missing)} (has {', '.join(reader.field_names)})")
    labels = label_column(reader)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{beton}: label {bad} out of range 0..{num_classes - 1}")
    index = _column(reader, "index")
    if not np.array_equal(index, np.arange(n)):
        raise DataError(f"{beton}: the index field is not 0..{n - 1} in file order")
    return meta, reader


def _column(reader, name: str) -> np.ndarray:
    f_ix = reader.field_names.index(name)
    return np.asarray(reader.metadata[f"f{f_ix}"], dtype=np.int64)


def label_column(reader) -> np.ndarray:
    """The labels of a .beton from its metadata table (no decoding)."""
    return _column(reader, "label")


def read_labels(beton: str | os.PathLike) -> np.ndarray:
    """int64 [n] labels of a checked .beton, in file order."""
    _, reader = open_beton(beton, verify="size")
    return label_column(reader)


def _check_indices(indices, n: int, beton) -> np.ndarray | None:
    if indices is None:
        return None
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"indices for {beton} must be a non-empty 1-D list of integers")
    if idx.min() < 0 or idx.max() >= n:
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise DataError(f"index {bad} out of range for {beton} ({n} samples)")
    if len(np.unique(idx)) != len(idx):
        raise DataError(f"indices for {beton} repeat a sample")
    return idx.astype(np.uint64)


# ----------------------------------------------------------------------------- loading


def _image_pipeline(meta: dict, size: int | None, ratio: float = 1.0):
    """FFCV image pipeline -> uint8 [B,3,H,W] (channels-last memory).

    Raw files of one image shape decode as stored. JPEG files of varying sizes decode the
    central square (side ``ratio`` x the shorter side) resized to ``size`` x ``size``.
    """
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    if meta.get("image_shape"):
        decoder = SimpleRGBImageDecoder()
    else:
        decoder = CenterCropRGBImageDecoder((int(size), int(size)), ratio=float(ratio))
    return [decoder, ToTensor(), ToTorchImage(channels_last=True)]


def _sidecar(beton) -> dict:
    """The sidecar dict, or {} when it is missing or unreadable (open_beton then reports why)."""
    try:
        return json.loads(meta_path(beton).read_text())
    except (OSError, ValueError):
        return {}


def _int_pipeline():
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor

    return [IntDecoder(), ToTensor()]


def _rank(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed=True needs the torch.distributed process group initialised before the loader is built")
    return dist.get_rank(), dist.get_world_size()


def _make_guarded_iterator_class():
    _import_ffcv()
    from ffcv.loader.epoch_iterator import EpochIterator

    class GuardedEpochIterator(EpochIterator):
        """FFCV's epoch iterator that fails instead of hanging.

        In FFCV 1.0.2 an exception inside a pipeline kills the loader thread after printing a
        traceback, and the consumer then waits forever. Here the exception is kept and re-raised
        as DataError, and a batch that takes longer than ``timeout_s`` raises DataError.
        """

        def __init__(self, loader, order, timeout_s: float, where: str):
            self.error: BaseException | None = None
            self.timeout_s = float(timeout_s)
            self.where = where
            super().__init__(loader, order)

        def run(self):
            try:
                super().run()
            except BaseException as exc:  # noqa: BLE001 - reported to the consumer
                self.error = exc

        def __next__(self):
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    result = self.output_queue.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self.error is not None:
                        self.close()
                        exc = self.error
                        raise DataError(f"loading {self.where} failed in the FFCV pipeline: {type(exc).__name__}: {exc}") from None
                    if not self.is_alive() and self.output_queue.empty():
                        self.close()
                        raise DataError(f"loading {self.where} failed: the FFCV loader thread stopped without a batch")
                    if time.monotonic() > deadline:
                        self.close()
                        raise DataError(f"loading {self.where}: no batch within {self.timeout_s:g} s (FFCV loader stalled)")
            if result is None:
                self.close()
                raise StopIteration
            slot, result = result
            if self.cuda_streams and self.cuda_streams[0] is not None:
                self.current_stream.wait_stream(self.cuda_streams[slot])
            return result

    return GuardedEpochIterator


class _BetonLoader:
    """Shared setup of the SSL and eval loaders: checks, FFCV Loader, guarded epoch iteration."""

    def __init__(self, beton, *, batch_size: int, num_workers: int, order: str, seed: int, distributed: bool,
                 drop_last: bool, indices, verify: str, fetch_timeout_s: float, batches_ahead: int,
                 crop: tuple[int | None, float]):
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.beton = Path(beton)
        self.meta, reader = open_beton(self.beton, verify)
        if not self.meta.get("image_shape") and not crop[0]:
            raise DataError(f"{self.beton} holds JPEG images of varying sizes: give decode_size / image_size")
        self.num_samples = int(self.meta["num_samples"])
        self.num_classes = int(self.meta["num_classes"])
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.rank, self.world_size = _rank(distributed)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.fetch_timeout_s = float(fetch_timeout_s)
        idx = _check_indices(indices, self.num_samples, self.beton)
        _import_ffcv()
        from ffcv.loader import Loader, OrderOption

        threads = torch.get_num_threads()
        try:
            self.loader = Loader(
                str(self.beton),
                batch_size=self.batch_size,
                num_workers=int(num_workers),
                order=OrderOption.RANDOM if order == "random" else OrderOption.SEQUENTIAL,
                distributed=distributed,
                seed=self.seed,
                indices=idx,
                pipelines={"image": _image_pipeline(self.meta, *crop), "label": _int_pipeline(),
                           "index": _int_pipeline()},
                drop_last=drop_last,
                batches_ahead=int(batches_ahead),
                os_cache=True,
            )
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot open {self.beton} with FFCV ({type(exc).__name__}: {exc})") from None
        finally:
            torch.set_num_threads(threads)  # FFCV's Loader sets torch's thread count to num_workers
        if len(self.loader) == 0:
            raise DataError(
                f"{self.beton}: {self.num_samples} samples give no full batch of {self.batch_size} per rank "
                f"({self.world_size} ranks, drop_last={drop_last})"
            )
        self._iterator_cls = _make_guarded_iterator_class()

    def __len__(self) -> int:
        return len(self.loader)

    def _batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, tuple]]:
        n_batches = len(self)
        if not 0 <= int(start_step) <= n_batches:
            raise DataError(f"start_step must be in 0..{n_batches}, got {start_step}")
        if start_step == n_batches:
            return
        order = self.loader.traversal_order.sample_order(int(epoch))
        order = order[: n_batches * self.batch_size][int(start_step) * self.batch_size:]
        it = self._iterator_cls(self.loader, order, self.fetch_timeout_s, str(self.beton))
        try:
            for step, batch in enumerate(it, start=int(start_step)):
                yield step, batch
        finally:
            it.close()


class SSLLoader(_BetonLoader):
    """K augmented views per image for SSL pre-training.

    beton: file written by :func:`write_beton`. batch_size: per rank. recipe: "cifar" or
    "imagenet" (:mod:`ltssl.data.augment`). ``epoch(e, start_step)`` yields dicts with
    ``views`` (list of num_views float32 [B,3,S,S], normalised, on ``device``), ``label`` and
    ``index`` (int64 [B] on ``device``). Deterministic given (seed, epoch, step, rank).
    """

    def __init__(self, beton, *, batch_size: int, num_views: int, image_size: int, recipe: "str | Recipe", seed: int,
                 distributed: bool, device, num_workers: int, drop_last: bool = True, indices=None,
                 verify: str = "auto", fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S, batches_ahead: int = 2,
                 decode_size: int | None = None):
        if int(num_views) < 1:
            raise DataError(f"num_views must be >= 1, got {num_views}")
        if int(image_size) < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.recipe = get_recipe(recipe)
        self.num_views = int(num_views)
        self.image_size = int(image_size)
        self.device = torch.device(device)
        decode_size = decode_size or (_sidecar(beton) or open_beton(beton, "size")[0]).get("decode_size")
        super().__init__(beton, batch_size=batch_size, num_workers=num_workers, order="random", seed=seed,
                         distributed=distributed, drop_last=drop_last, indices=indices, verify=verify,
                         fetch_timeout_s=fetch_timeout_s, batches_ahead=batches_ahead, crop=(decode_size, 1.0))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        for step, (images, labels, index) in self._batches(epoch, start_step):
            gen = generator_for(self.seed, int(epoch), step, self.rank)
            images = images.to(self.device, non_blocking=True)
            views = make_views(images, gen, self.recipe, self.image_size, self.num_views, self.mean, self.std)
            yield {
                "views": views,
                # FFCV reuses its output buffers: copy what outlives this step.
                "label": labels.reshape(-1).to(self.device, copy=True),
                "index": index.reshape(-1).to(self.device, copy=True),
            }


class EvalLoader(_BetonLoader):
    """Plain images in file order for kNN and linear probes: dicts of ``image`` (float32 [B,3,S,S],
    normalised, no augmentation), ``label``, ``index``. Every sample once (last batch may be short);
    with ``distributed`` each rank gets its DistributedSampler shard (padded to equal length).
    ``image_size`` None keeps the stored size for square images (else resizes to it).
    """

    def __init__(self, beton, *, batch_size: int, device, num_workers: int, distributed: bool = False,
                 image_size: int | None = None, indices=None, verify: str = "auto",
                 fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S, batches_ahead: int = 2, decode_size: int | None = None):
        self.device = torch.device(device)
        side = _sidecar(beton) or open_beton(beton, "size")[0]  # open_beton explains a missing sidecar
        shape = side.get("image_shape")
        if image_size is None:
            image_size = side.get("eval_size") or (shape[0] if shape else None)
        if image_size is None:
            raise DataError(f"{beton} holds JPEG images of varying sizes: give image_size")
        self.image_size = int(image_size)
        decode_size = decode_size or side.get("decode_size") or self.image_size
        # JPEG: the classic eval crop, the central (image_size / decode_size) of the shorter side (224/256).
        crop = (self.image_size, min(1.0, self.image_size / decode_size))
        super().__init__(beton, batch_size=batch_size, num_workers=num_workers, order="sequential", seed=0,
                         distributed=distributed, drop_last=False, indices=indices, verify=verify,
                         fetch_timeout_s=fetch_timeout_s, batches_ahead=batches_ahead, crop=crop)

    def __iter__(self) -> Iterator[dict]:
        for _, (images, labels, index) in self._batches(0, 0):
            images = images.to(self.device, non_blocking=True)
            yield {
                "image": eval_transform(images, self.image_size, self.mean, self.std),
                "label": labels.reshape(-1).to(self.device, copy=True),
                "index": index.reshape(-1).to(self.device, copy=True),
            }


def read_beton(beton, *, batch_size: int = 256, num_workers: int = 1, verify: str = "auto") -> dict:
    """Every sample of a raw .beton as stored: dict of image uint8 [n,H,W,3], label and index int64 [n] (numpy)."""
    base = _BetonLoader(beton, batch_size=batch_size, num_workers=num_workers, order="sequential", seed=0,
                        distributed=False, drop_last=False, indices=None, verify=verify,
                        fetch_timeout_s=DEFAULT_FETCH_TIMEOUT_S, batches_ahead=1, crop=(_sidecar(beton).get("decode_size"), 1.0))
    images, labels, index = [], [], []
    for _, (img, lab, idx) in base._batches(0, 0):
        images.append(img.permute(0, 2, 3, 1).numpy().copy())
        labels.append(lab.reshape(-1).numpy().copy())
        index.append(idx.reshape(-1).numpy().copy())
    return {"image": np.concatenate(images), "label": np.concatenate(labels), "index": np.concatenate(index)}
