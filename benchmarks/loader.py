#!/usr/bin/env python
"""Loader throughput: ltssl's loaders vs the torchvision reference on the same CIFAR-shaped data, side by side.

    python benchmarks/loader.py                      # writes benchmarks/results/loader.json

Data: N random structured 32 px images written in the CIFAR "python version" layout, read back with
ltssl's CIFAR reader; the FFCV sides read a raw .beton of them, the reference sides the same arrays.
Every configuration makes two views per image (the SSL setting). All sides of a configuration are
built and warmed up (one epoch: numba compilation, DataLoader worker start-up), then timed in
interleaved rounds (one epoch of each side per round), so load changes on a shared machine hit
every side alike. Figures are images per second (one image = its two views), wall clock and per
CPU-second (this process, all its threads, + the DataLoader workers): the CPU-second figures and
their ratios do not depend on what else runs on the machine.

1. ``full``: the SimSiam CIFAR recipe (crop, flip, colour jitter p 0.8, grayscale p 0.2, normalise).
   ``ffcv``: ltssl.data.ffcv.SSLLoader (FFCV decode + the fused numba augmentation of
   ltssl.data.fused, reproducible views); ``resident``: ltssl.data.resident.ResidentLoader on the
   CPU (decoded once, index gather + the same augmentation); ``ffcv_batched_torch``: SSLLoader with
   the batched torch augmentation (the GPU path, here on CPU). References: ltssl.data.reference,
   torchvision per image in DataLoader workers, on PIL images (the SimSiam/MoCo code's way) and on
   uint8 tensors; ratios are against the faster of the two, per measure.
2. ``decode_crop_flip``: decode + random resized crop + flip + normalise only.
   ``ffcv``: FFCV's own numba ops, the image decoded once and fed to both views' pipelines (not
   reproducible per step); ``ffcv_ltssl``: SSLLoader with a crop+flip recipe. Same references.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ltssl.data import augment  # noqa: E402
from ltssl.data import ffcv as lf  # noqa: E402
from ltssl.data.augment import RECIPES, Recipe  # noqa: E402
from ltssl.data.ffcv import SSLLoader, _import_ffcv, write_beton  # noqa: E402
from ltssl.data.reference import reference_loader  # noqa: E402
from ltssl.data.resident import ResidentLoader  # noqa: E402
from ltssl.data.sources import load_cifar  # noqa: E402
from ltssl.io import atomic_write_text  # noqa: E402
from test_data_util import write_cifar  # noqa: E402

CROPFLIP = Recipe("cropflip", jitter_p=0.0, gray_p=0.0)


def _children_cpu_s(pids: list[int]) -> float:
    """utime + stime of processes ``pids`` (DataLoader workers) from /proc, in seconds."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Side:
    """One loader under test: ``run(epoch)`` -> images served; ``pids()``: its worker processes."""

    def __init__(self, run, pids=lambda: []):
        self.run, self.pids = run, pids
        self.wall = self.cpu = 0.0
        self.images = 0

    def timed_epoch(self, epoch: int) -> None:
        pids = self.pids()
        t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu_s(pids)
        self.images += self.run(epoch)
        self.cpu += time.process_time() - c0 + _children_cpu_s(pids) - w0
        self.wall += time.perf_counter() - t0

    def summary(self) -> dict:
        return {"images_per_s": round(self.images / self.wall, 1), "images_per_cpu_s": round(self.images / self.cpu, 1),
                "seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3), "images": self.images}


def _count(batches) -> int:
    return sum(len(b["label"]) for b in batches)


def _sides(beton: Path, images: np.ndarray, labels: np.ndarray, mean, std, args) -> dict[str, dict]:
    """name -> {side -> factory of Side}: every configuration's loaders (built lazily, one configuration at a time)."""
    B, W = args.batch_size, args.num_workers

    def ssl(recipe, fused=None):
        loader = SSLLoader(beton, batch_size=B, num_views=2, image_size=32, recipe=recipe, seed=0, distributed=False,
                           device=torch.device("cpu"), num_workers=W)
        torch.set_num_threads(args.torch_threads)  # FFCV's Loader sets torch's thread count to num_workers
        # fused=False: SSLLoader with the batched torch augmentation (what runs on a GPU) instead of the CPU kernel
        views = functools.partial(augment.make_views, fused=fused)

        def run(epoch):
            with mock.patch.object(lf, "make_views", views) if fused is not None else contextlib.nullcontext():
                return _count(loader.epoch(epoch))
        return Side(run)

    def resident(recipe):
        loader = ResidentLoader(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, batch_size=B, num_views=2,
                                image_size=32, recipe=recipe, seed=0, mean=mean, std=std, device="cpu")
        return Side(lambda e: _count(loader.epoch(e)))

    def ref(recipe, backend="pil"):
        loader = reference_loader(images, labels, batch_size=B, num_views=2, image_size=32, recipe=recipe, mean=mean, std=std,
                                  seed=0, num_workers=W, backend=backend)
        return Side(lambda e: _count(loader), lambda: [w.pid for w in loader._iterator._workers])  # persistent workers

    return {
        "full": {"ffcv": lambda: ssl("cifar"), "resident": lambda: resident("cifar"),
                 "ffcv_batched_torch": lambda: ssl("cifar", fused=False),
                 "reference_pil": lambda: ref("cifar"), "reference_tensor": lambda: ref("cifar", "tensor")},
        "decode_crop_flip": {"ffcv": lambda: _ffcv_numba_side(beton, mean, std, args), "ffcv_ltssl": lambda: ssl(CROPFLIP),
                             "reference_pil": lambda: ref(CROPFLIP), "reference_tensor": lambda: ref(CROPFLIP, "tensor")},
    }


def _ffcv_numba_side(beton: Path, mean, std, args) -> Side:
    """FFCV's own RandomResizedCrop + flip per view, the image decoded once for both views."""
    _import_ffcv()
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, RandomResizedCrop, ToTensor, ToTorchImage

    dec = SimpleRGBImageDecoder()
    m255, s255 = np.array(mean) * 255, np.array(std) * 255

    def view_ops():
        return [RandomResizedCrop((0.2, 1.0), (3 / 4, 4 / 3), 32), RandomHorizontalFlip(),
                NormalizeImage(m255, s255, np.float32), ToTensor(), ToTorchImage()]

    loader = Loader(str(beton), batch_size=args.batch_size, num_workers=args.num_workers, order=OrderOption.RANDOM, seed=0,
                    drop_last=True, batches_ahead=2, os_cache=True,
                    pipelines={"image": [dec, *view_ops()], "view2": PipelineSpec(dec, transforms=view_ops()),
                               "label": None, "index": None})
    torch.set_num_threads(args.torch_threads)
    return Side(lambda e: sum(len(batch[0]) for batch in loader))


def _measure(factories: dict, epochs: int) -> dict:
    """Build and warm every side, then ``epochs`` interleaved rounds; summaries and ratios to the faster reference."""
    sides = {}
    for name, make in factories.items():
        sides[name] = make()
        sides[name].run(0)  # warm-up epoch
    for epoch in range(1, epochs + 1):
        for side in sides.values():
            side.timed_epoch(epoch)
    out = {name: side.summary() for name, side in sides.items()}
    refs = [out[s] for s in out if s.startswith("reference")]
    best = {k: max(r[k] for r in refs) for k in ("images_per_s", "images_per_cpu_s")}
    for name in list(out):
        if not name.startswith("reference"):
            out[f"ratio_{name}_vs_reference"] = round(out[name]["images_per_s"] / best["images_per_s"], 2)
            out[f"cpu_ratio_{name}_vs_reference"] = round(out[name]["images_per_cpu_s"] / best["images_per_cpu_s"], 2)
    for name, side in out.items():
        if isinstance(side, dict):
            print(f"{name:19s} {side['images_per_s']:10.0f} img/s {side['images_per_cpu_s']:10.0f} img/CPU-s", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (interleaved rounds) per configuration, after one warm-up")
    p.add_argument("--num-workers", type=int, default=2, help="FFCV threads / DataLoader worker processes")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                   help="torch threads of the main process (augmentation); default: every core, as a training job uses and "
                        "as the reference's workers do")
    p.add_argument("--only", choices=["full", "decode_crop_flip"], help="one configuration only")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    load_start = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), "cifar10", per_class_train=args.num_images // 10, per_class_test=1)
        src = load_cifar("cifar10", tmp)
        images, labels = src.train_images, src.train_labels
        mean = (images.reshape(-1, 3).mean(0) / 255).tolist()
        std = (images.reshape(-1, 3).std(0) / 255).tolist()
        beton = Path(tmp) / "bench.beton"
        t0 = time.perf_counter()
        write_beton(beton, lambda i: images[i], labels, num_classes=10, mean=mean, std=std, num_workers=args.num_workers)
        write_s = time.perf_counter() - t0
        for name, factories in _sides(beton, images, labels, mean, std, args).items():
            if args.only in (None, name):
                print(f"--- {name}", flush=True)
                results[name] = _measure(factories, args.epochs)
    out = {
        "benchmark": "loader",
        "command": "python benchmarks/loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what": "images/s, two views per image, 32 px CIFAR-layout data; ltssl loaders vs torchvision reference "
                "(DataLoader workers), interleaved rounds",
        "config": {"num_images": args.num_images, "batch_size": args.batch_size, "num_workers": args.num_workers,
                   "torch_threads": args.torch_threads, "timed_epochs": args.epochs, "image_size": 32, "num_views": 2},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "loadavg_1m_start": round(load_start[0], 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "beton_write_s": round(write_s, 2),
        "results": results,
        "recipes": {"full": str(RECIPES["cifar"]), "decode_crop_flip": str(CROPFLIP)},
        "notes": "images_per_s is wall-clock throughput (depends on what else ran: see loadavg); images_per_cpu_s counts "
                 "the CPU time of the process (all threads) and its DataLoader workers, and is the measure to compare on a "
                 "shared machine. 'ffcv' and 'resident' in full use the fused numba CPU augmentation (ltssl.data.fused); "
                 "'ffcv_batched_torch' the batched torch ops that run on a GPU. 'ffcv' in decode_crop_flip uses FFCV's "
                 "numba crop/flip (not reproducible per step); 'ffcv_ltssl' is SSLLoader's reproducible crop+flip.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
