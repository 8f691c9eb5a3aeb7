#!/usr/bin/env python
"""Loader throughput: FFCV vs the torchvision reference on the same CIFAR-shaped data, side by side.

    python benchmarks/loader.py                      # writes benchmarks/results/loader.json

Data: N random structured 32 px images written in the CIFAR "python version" layout, read back with
ltssl's CIFAR reader; the FFCV side reads a raw .beton of them, the reference side the same arrays.
Every configuration makes two views per image (the SSL setting) and is timed over full epochs after
one warm-up epoch (FFCV's numba compilation, DataLoader worker start-up). Figures are images per
second (one image = its two views), wall-clock and per CPU-second (this process + DataLoader workers).

1. ``full``: the SimSiam CIFAR recipe (crop, flip, colour jitter p 0.8, grayscale p 0.2, normalise).
   FFCV side: ltssl.data.ffcv.SSLLoader (FFCV decode + batched torch augmentation, reproducible views).
   References: ltssl.data.reference, torchvision per image in DataLoader workers, on PIL images
   (the SimSiam/MoCo code's way) and on uint8 tensors; ratios are against the faster of the two.
2. ``decode_crop_flip``: decode + random resized crop + flip + normalise only.
   FFCV sides: (a) FFCV's own numba ops, the image decoded once and fed to both views' pipelines;
   (b) SSLLoader with a crop+flip recipe (batched torch). References: the same recipe, PIL and tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _children_cpu_s(pids: list[int]) -> float:
    """utime + stime of processes ``pids`` (DataLoader workers) from /proc, in seconds."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _epochs(make_iter, epochs: int, worker_pids=lambda: []) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its loader workers, images) over ``epochs`` timed
    epochs after one warm-up epoch. CPU seconds do not depend on what else runs on the machine."""
    n_warm = sum(len(b) for b in make_iter(0))
    assert n_warm > 0
    pids = worker_pids()
    t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu_s(pids)
    images = 0
    for e in range(1, epochs + 1):
        images += sum(len(b) for b in make_iter(e))
    cpu = time.process_time() - c0 + _children_cpu_s(pids) - w0
    return time.perf_counter() - t0, cpu, images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration (after one warm-up)")
    p.add_argument("--num-workers", type=int, default=2, help="FFCV threads / DataLoader worker processes")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                   help="torch threads of the main process (batched augmentation); default: every core, as a training job "
                        "uses and as the reference's workers do")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.torch_threads)
    from ltssl.io import atomic_write_text
    from ltssl.data.augment import RECIPES, Recipe
    from ltssl.data.ffcv import SSLLoader, _import_ffcv, write_beton
    from ltssl.data.reference import reference_loader
    from ltssl.data.sources import load_cifar
    from test_data_util import write_cifar

    load_start = os.getloadavg()
    results: dict = {}
    cropflip = Recipe("cropflip", jitter_p=0.0, gray_p=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        per_class = args.num_images // 10
        write_cifar(Path(tmp), "cifar10", per_class_train=per_class, per_class_test=1)
        src = load_cifar("cifar10", tmp)
        images, labels = src.train_images, src.train_labels
        mean = (images.reshape(-1, 3).mean(0) / 255).tolist()
        std = (images.reshape(-1, 3).std(0) / 255).tolist()
        beton = Path(tmp) / "bench.beton"
        t0 = time.perf_counter()
        write_beton(beton, lambda i: images[i], labels, num_classes=10, mean=mean, std=std, num_workers=args.num_workers)
        write_s = time.perf_counter() - t0
        B, W = args.batch_size, args.num_workers

        def ssl_iter(recipe):
            loader = SSLLoader(beton, batch_size=B, num_views=2, image_size=32, recipe=recipe, seed=0, distributed=False,
                               device=torch.device("cpu"), num_workers=W)
            torch.set_num_threads(args.torch_threads)
            return lambda e: (b["label"] for b in loader.epoch(e))

        def ref_iter(recipe, backend="pil"):
            loader = reference_loader(images, labels, batch_size=B, num_views=2, image_size=32, recipe=recipe, mean=mean,
                                      std=std, seed=0, num_workers=W, backend=backend)
            it = lambda e: (b["label"] for b in loader)  # noqa: E731
            it.worker_pids = lambda: [w.pid for w in loader._iterator._workers]  # persistent workers
            return it

        def ffcv_numba_iter():
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

            loader = Loader(str(beton), batch_size=B, num_workers=W, order=OrderOption.RANDOM, seed=0, drop_last=True,
                            batches_ahead=2, os_cache=True,
                            pipelines={"image": [dec, *view_ops()], "view2": PipelineSpec(dec, transforms=view_ops()),
                                       "label": None, "index": None})
            torch.set_num_threads(args.torch_threads)
            return lambda e: (batch[0] for batch in loader)

        configs = {
            "full": {"ffcv": lambda: ssl_iter("cifar"), "reference_pil": lambda: ref_iter("cifar"),
                     "reference_tensor": lambda: ref_iter("cifar", "tensor")},
            "decode_crop_flip": {"ffcv": ffcv_numba_iter, "ffcv_ltssl_batched": lambda: ssl_iter(cropflip),
                                 "reference_pil": lambda: ref_iter(cropflip),
                                 "reference_tensor": lambda: ref_iter(cropflip, "tensor")},
        }
        for name, sides in configs.items():
            results[name] = {}
            for side, make in sides.items():
                it = make()
                secs, cpu, n = _epochs(it, args.epochs, getattr(it, "worker_pids", lambda: []))
                results[name][side] = {"images_per_s": round(n / secs, 1), "images_per_cpu_s": round(n / cpu, 1),
                                       "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3), "images": n}
                print(f"{name:17s} {side:19s} {n / secs:10.0f} img/s {n / cpu:10.0f} img/CPU-s", flush=True)
            # ratios against the faster torchvision reference (PIL or tensor transforms), per measure
            refs = [results[name][side] for side in sides if side.startswith("reference")]
            ref = {"images_per_s": max(r["images_per_s"] for r in refs),
                   "images_per_cpu_s": max(r["images_per_cpu_s"] for r in refs)}
            for side in sides:
                if not side.startswith("reference"):
                    results[name][f"ratio_{side}_vs_reference"] = round(results[name][side]["images_per_s"] / ref["images_per_s"], 2)
                    results[name][f"cpu_ratio_{side}_vs_reference"] = round(
                        results[name][side]["images_per_cpu_s"] / ref["images_per_cpu_s"], 2)

    out = {
        "benchmark": "loader",
        "command": "python benchmarks/loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what": "images/s, two views per image, 32 px CIFAR-layout data; FFCV vs torchvision reference (DataLoader workers)",
        "config": {"num_images": args.num_images, "batch_size": B, "num_workers": W, "torch_threads": args.torch_threads,
                   "timed_epochs": args.epochs, "image_size": 32, "num_views": 2},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "loadavg_1m_start": round(load_start[0], 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "beton_write_s": round(write_s, 2),
        "results": results,
        "recipes": {"full": str(RECIPES["cifar"]), "decode_crop_flip": str(cropflip)},
        "notes": "images_per_s is wall-clock throughput (depends on what else ran: see loadavg); images_per_cpu_s counts "
                 "the CPU time of the process and its DataLoader workers (independent of other load). "
                 "On CPU the batched colour augmentation (not the loader) bounds the full recipe; the decode+crop+flip "
                 "rows isolate the loader. 'ffcv' in decode_crop_flip uses FFCV's numba crop/flip (not reproducible per "
                 "step); 'ffcv_ltssl_batched' is what SSLLoader does (reproducible views, torch grid_sample crop).",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
