#!/usr/bin/env python
"""Cost of extra views: images/s of the FFCV loader and of one training step for K = 2, 3, 4.

Multi-view SSL (Sharma and Padmanabhan 2025; ltssl/methods/multiview.py) decodes each image
once and augments it K times (ltssl/data/ffcv.py), then the loss averages over the view
pairs. This measures, side by side in one process and on the same prepared data
(digits, upsampled to 32 px: CIFAR-shaped 3x32x32 images):

* ``loader``: one epoch of ``SSLLoader(num_views=K)`` (decode + K augmentations), no model;
* ``step``: ``train_step`` (forward of K views, the pairwise loss, backward, SGD) on batches
  already in memory;
* ``loader+step``: one training epoch, both together (what a job sees).

Images/s counts images (rows of the batch), not views: an image with K views is one image.
The K values are measured round-robin (``--rounds`` times) so that drift of a shared machine
hits them alike; each round records the 1-minute load average. Two figures per phase: wall-clock
images/s (best round: the least disturbed) and images per second of the process's CPU time
(median round; all threads, so the loader's work counts): the second is what K costs, robust to
other jobs sharing the machine. Every round is in the JSON. Writes ``benchmarks/results/multiview.json``.

    .venv/bin/python benchmarks/multiview.py [--backbone small_cnn] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ltssl.config import load_config  # noqa: E402
from ltssl.io import atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="small_cnn", help="small_cnn (digits default) or resnet18_cifar")
    parser.add_argument("--method", default="simsiam", help="simsiam, simclr or moco_v2")
    parser.add_argument("--views", default="2,3,4")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--step-batches", type=int, default=8, help="batches timed for the step-only figure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", default=None, help="prepared-data cache (default: a temporary folder)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multiview.json"))
    args = parser.parse_args(argv)
    views_list = [int(v) for v in args.views.split(",")]

    from ltssl.data import prepare_dataset
    from ltssl.data.ffcv import SSLLoader
    from ltssl.methods import build_method
    from ltssl.optim import build_optimizer
    from ltssl.train import train_step

    tmp = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ltssl-bench-mv-")
        cache_dir = tmp.name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = {
        "data.dataset": "digits", "data.imbalance_ratio": 1.0, "data.image_size": 32, "data.cache_dir": cache_dir,
        "data.num_workers": 2, "model.backbone": args.backbone, "method.name": args.method, "optim.name": "sgd",
        "train.batch_size": args.batch_size, "train.seed": 0,
    }
    cfg0 = load_config(overrides=base)
    data = prepare_dataset(cfg0.data)

    setups = {}
    for k in views_list:
        cfg = load_config(overrides={**base, "data.num_views": k})
        torch.manual_seed(0)
        method = build_method(cfg, data.num_classes).to(device)
        loader = SSLLoader(data.train_beton, batch_size=args.batch_size, num_views=k, image_size=32, recipe="cifar",
                           seed=0, distributed=False, device=device, num_workers=cfg.data.num_workers)
        setups[k] = (cfg, method, build_optimizer(cfg.optim, method), loader)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    class Clock:
        """Wall and process CPU time (all threads, the loader's included) of one measured phase."""

        def __enter__(self):
            self.wall, self.cpu = time.perf_counter(), time.process_time()
            return self

        def __exit__(self, *exc):
            sync()
            self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def loader_epoch(k, epoch):
        _, _, _, loader = setups[k]
        n = 0
        with Clock() as c:
            for batch in loader.epoch(epoch):
                n += batch["views"][0].shape[0]
        return n, c.wall, c.cpu

    def train_epoch(k, epoch):
        _, method, opt, loader = setups[k]
        n = 0
        with Clock() as c:
            for batch in loader.epoch(epoch):
                train_step(method, opt, batch)
                n += batch["views"][0].shape[0]
        return n, c.wall, c.cpu

    cached = {}

    def step_only(k):
        _, method, opt, loader = setups[k]
        if k not in cached:
            cached[k] = [{**b, "views": [v.clone() for v in b["views"]]} for b, _ in zip(loader.epoch(0), range(args.step_batches))]
        batches = cached[k]
        train_step(method, opt, batches[0])  # warm
        sync()
        n = 0
        with Clock() as c:
            for b in batches:
                train_step(method, opt, b)
                n += b["views"][0].shape[0]
        return n, c.wall, c.cpu

    # warm-up: every new FFCV loader pays numba compilation in its first epoch
    for k in views_list:
        loader_epoch(k, 0)
        train_epoch(k, 0)

    phases = ("loader", "step", "loader+step")
    figures = {k: {name: [] for name in phases} for k in views_list}   # (images, wall s, cpu s) per round
    load = []
    for r in range(args.rounds):
        load.append(round(os.getloadavg()[0], 2))
        for k in views_list:
            figures[k]["loader"].append(loader_epoch(k, r + 1))
            figures[k]["step"].append(step_only(k))
            figures[k]["loader+step"].append(train_epoch(k, r + 1))

    rows = []
    ref_cpu = None
    for k in views_list:
        wall_best = {name: max(n / w for n, w, _ in v) for name, v in figures[k].items()}
        cpu_med = {name: statistics.median(n / c for n, _, c in v) for name, v in figures[k].items()}
        if ref_cpu is None:
            ref_cpu = cpu_med
        rows.append({
            "num_views": k,
            "view_pairs_all_pairs": k * (k - 1) // 2,
            "loader_images_per_s": round(wall_best["loader"], 1),
            "step_images_per_s": round(wall_best["step"], 1),
            "loader_step_images_per_s": round(wall_best["loader+step"], 1),
            "loader_images_per_cpu_s": round(cpu_med["loader"], 1),
            "step_images_per_cpu_s": round(cpu_med["step"], 1),
            "loader_step_images_per_cpu_s": round(cpu_med["loader+step"], 1),
            "cpu_time_per_image_vs_first_k": round(ref_cpu["loader+step"] / cpu_med["loader+step"], 3),
            "rounds_images_per_s": {name: [round(n / w, 1) for n, w, _ in v] for name, v in figures[k].items()},
            "rounds_images_per_cpu_s": {name: [round(n / c, 1) for n, _, c in v] for name, v in figures[k].items()},
        })
    k0 = views_list[0]
    extra = [(1 / row["loader_step_images_per_cpu_s"] - 1 / rows[0]["loader_step_images_per_cpu_s"]) / (row["num_views"] - k0)
             for row in rows[1:]]
    result = {
        "benchmark": "multiview",
        "what": "images (not views) per second of SSLLoader epochs, train_step on in-memory batches, and both together, "
                "for K views per image, measured round-robin after one warm-up epoch per K. *_images_per_s: wall clock, "
                "best round (the least disturbed). *_images_per_cpu_s: per second of this process's CPU time (all its "
                "threads), median round: robust to other jobs on the machine; cpu_time_per_image_vs_first_k and "
                "cpu_seconds_per_image_per_extra_view come from it",
        "data": {"dataset": "digits (sklearn load_digits, upsampled)", "image_shape": [3, 32, 32], "n_train": data.n_train,
                 "imbalance_ratio": 1.0},
        "method": args.method, "backbone": args.backbone, "pairing": cfg0.method.multiview.pairing,
        "proj_dim": cfg0.method.proj_dim, "batch_size": args.batch_size, "optimizer": "sgd", "device": str(device),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "rounds": args.rounds, "load_average_1min_per_round": load,
        "results": rows,
        "cpu_seconds_per_image_per_extra_view": round(statistics.mean(extra), 6) if extra else None,
        "note": "2-core CPU shared with other jobs (see the load averages): wall figures move with the load, CPU-time figures much less",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"K={row['num_views']}: wall img/s (best): loader {row['loader_images_per_s']:8.1f}  step {row['step_images_per_s']:7.1f}  "
              f"loader+step {row['loader_step_images_per_s']:7.1f} | img per CPU-s (median): loader {row['loader_images_per_cpu_s']:8.1f}  "
              f"step {row['step_images_per_cpu_s']:7.1f}  loader+step {row['loader_step_images_per_cpu_s']:7.1f}  "
              f"CPU time/image x{row['cpu_time_per_image_vs_first_k']:.2f}")
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
