"""Time per training step: SGD vs SAM vs rwSAM (label_power, kde), side by side in one run.

Each variant is the real training step (:func:`ltssl.train.train_step`) of SimSiam on
ResNet-18 (CIFAR stem) with its own model and optimizer, on the same synthetic batch of
two views. Steps are interleaved round-robin (variant A, B, C, D, A, B, ...) so that load
changes on a shared machine hit every variant alike; the median is reported. On the CPU each
step is timed twice: wall clock and this process's CPU time (``time.process_time``, all
threads); on a machine shared with other jobs the CPU time is the steadier measure of the
work, and the goals are evaluated on both (``goals`` and ``goals_cpu_time``).

The KDE refresh is timed as the trainer does it: a no-grad, eval-mode feature pass
(:func:`ltssl.eval.extract_features`) over images at the trainer's feature-pass batch size
(``ltssl.train.EVAL_BATCH_SIZE``: 64 on the CPU, 512 on a GPU), scaled to
the training-set size ``--n-train`` (default 12,406: CIFAR-10-LT, ratio 100), plus the
chunked density of ``--n-train`` features (:func:`ltssl.optim.weights.kde_weights`),
measured at full size. Its share of an epoch is ``refresh / (steps_per_epoch * rwSAM-kde
step)``; the amortised rwSAM-kde step adds ``refresh / (steps_per_epoch * kde_every)``.

    .venv/bin/python benchmarks/step.py                      # CPU, about 1-2 minutes on 2 idle cores
    .venv/bin/python benchmarks/step.py --device cuda --batch-size 512 --steps 20

Writes ``benchmarks/results/step.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ltssl.config import load_config  # noqa: E402
from ltssl.io import atomic_write_text  # noqa: E402
from ltssl.eval import extract_features  # noqa: E402
from ltssl.methods import build_method  # noqa: E402
from ltssl.optim import SampleWeights, build_optimizer, kde_weights  # noqa: E402
from ltssl.train import EVAL_BATCH_SIZE, train_step  # noqa: E402

VARIANTS = {
    "sgd": {"optim.name": "sgd"},
    "sam": {"optim.name": "sam"},
    "rwsam_label_power": {"optim.name": "rwsam", "optim.weighting": "label_power"},
    "rwsam_kde": {"optim.name": "rwsam", "optim.weighting": "kde"},
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default="resnet18_cifar")
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the step (one process)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--proj-dim", type=int, default=2048, help="SimSiam projector width (the CIFAR recipe's 2048)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    ap.add_argument("--n-train", type=int, default=12406, help="training-set size for the KDE refresh (CIFAR-10-LT r=100)")
    ap.add_argument("--feature-images", type=int, default=512, help="images actually run through the feature pass")
    ap.add_argument("--kde-every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    amp = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    gen = torch.Generator().manual_seed(0)
    num_classes = 10
    class_counts = [int(args.n_train / num_classes)] * num_classes
    batch = {
        "views": [torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device, memory_format=memory_format)
                  for _ in range(2)],
        "label": torch.randint(0, num_classes, (args.batch_size,), generator=gen).to(device),
        "index": torch.randint(0, args.n_train, (args.batch_size,), generator=gen).to(device),
    }

    runs = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(overrides={"model.backbone": args.backbone, "data.image_size": args.image_size,
                                     "method.name": "simsiam", "method.proj_dim": args.proj_dim,
                                     "method.proj_hidden_dim": args.proj_dim, **overrides})
        torch.manual_seed(0)
        method = build_method(cfg, num_classes).to(device, memory_format=memory_format)
        optimizer = build_optimizer(cfg.optim, method)
        scheme = cfg.optim.weighting if cfg.optim.name == "rwsam" else "none"
        weights = SampleWeights(scheme, class_counts, args.n_train, device, cfg.optim.label_power_base)
        if scheme == "kde":
            weights.set_kde(torch.rand(args.n_train, generator=gen) + 0.5, epoch=0)
        runs[name] = (method, optimizer, weights, [], [])

    def timed(fn):
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - wall, time.process_time() - cpu

    def one_step(name):
        method, optimizer, weights, walls, cpus = runs[name]
        _, wall, cpu = timed(lambda: train_step(method, optimizer, batch,
                                                weights.batch_weights(batch) if weights.scheme != "none" else None, autocast=autocast))
        return wall, cpu

    for _ in range(args.warmup):
        for name in runs:
            one_step(name)
    for _ in range(args.steps):
        for name in runs:
            wall, cpu = one_step(name)
            runs[name][3].append(wall)
            runs[name][4].append(cpu)
    step_s = {name: statistics.median(run[3]) for name, run in runs.items()}
    step_cpu_s = {name: statistics.median(run[4]) for name, run in runs.items()}

    # KDE refresh: feature pass (measured on --feature-images, scaled to --n-train) + density at full size
    encoder = runs["rwsam_kde"][0].encoder
    n_feat = args.feature_images
    images = torch.randn(n_feat, 3, args.image_size, args.image_size, generator=gen)
    eval_bs = EVAL_BATCH_SIZE[device.type]
    eval_batches = [{"image": images[i:i + eval_bs].to(device, memory_format=memory_format),
                     "label": torch.zeros(min(eval_bs, n_feat - i), dtype=torch.long, device=device),
                     "index": torch.arange(i, min(i + eval_bs, n_feat), device=device)} for i in range(0, n_feat, eval_bs)]
    extract_features(encoder, eval_batches[:1], device, amp=amp, channels_last=device.type == "cuda")  # warm-up
    (feats, _), feature_wall, feature_cpu = timed(
        lambda: extract_features(encoder, eval_batches, device, amp=amp, channels_last=device.type == "cuda"))
    scale = args.n_train / n_feat
    all_feats = F.normalize(torch.randn(args.n_train, feats.shape[1], generator=gen), dim=1).to(device)
    w, density_wall, density_cpu = timed(lambda: kde_weights(all_feats, bandwidth=0.5, alpha=1.0))
    assert w.shape == (args.n_train,)
    steps_per_epoch = args.n_train // args.batch_size

    def kde_summary(step, feature_s, density_s):
        refresh_s = feature_s + density_s
        epoch_s = steps_per_epoch * step["rwsam_kde"]
        amortised = step["rwsam_kde"] + refresh_s / (steps_per_epoch * args.kde_every)
        return {"n_train": args.n_train, "feature_images_timed": n_feat, "feature_pass_s": feature_s, "density_s": density_s,
                "refresh_s": refresh_s, "steps_per_epoch": steps_per_epoch, "rwsam_kde_epoch_s": epoch_s,
                "fraction_of_epoch": refresh_s / epoch_s, "kde_every": args.kde_every,
                "amortised_fraction_of_epoch": refresh_s / args.kde_every / epoch_s,
                "fraction_of_epoch_by_kde_every": {k: refresh_s / k / epoch_s for k in (1, 2, 3, 5)},
                "feature_batch_size": eval_bs,
                "amortised_rwsam_kde_step_s": amortised, "amortised_ratio_to_sgd": amortised / step["sgd"]}

    def goals(step, kde):
        worst = max(step["rwsam_label_power"], step["rwsam_kde"])
        return {"rwsam_within_2.1x_sgd": worst / step["sgd"] <= 2.1, "rwsam_worst_ratio": worst / step["sgd"],
                "kde_refresh_under_5pct_of_epoch": kde["amortised_fraction_of_epoch"] < 0.05}

    kde_wall = kde_summary(step_s, feature_wall * scale, density_wall)
    kde_cpu = kde_summary(step_cpu_s, feature_cpu * scale, density_cpu)
    sgd = step_s["sgd"]
    result = {
        "benchmark": "step",
        "command": "benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_1min_at_start": load_at_start,
        "load_average_1min_at_end": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "setup": {"method": "simsiam", "backbone": args.backbone, "batch_size": args.batch_size, "image_size": args.image_size,
                  "views": 2, "proj_dim": args.proj_dim, "amp_bf16": amp, "channels_last": device.type == "cuda",
                  "timed_steps": args.steps, "warmup_steps": args.warmup, "statistic": "median, variants interleaved"},
        "step_s": step_s,
        "step_samples_s": {name: run[3] for name, run in runs.items()},
        "ratio_to_sgd": {name: s / sgd for name, s in step_s.items()},
        "kde_refresh": kde_wall,
        "goals": goals(step_s, kde_wall),
        "step_cpu_s": step_cpu_s,
        "step_cpu_samples_s": {name: run[4] for name, run in runs.items()},
        "ratio_to_sgd_cpu_time": {name: s / step_cpu_s["sgd"] for name, s in step_cpu_s.items()},
        "kde_refresh_cpu_time": kde_cpu,
        "goals_cpu_time": goals(step_cpu_s, kde_cpu),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "load_average_1min_at_end", "step_s", "ratio_to_sgd", "kde_refresh", "goals",
                                             "ratio_to_sgd_cpu_time", "kde_refresh_cpu_time", "goals_cpu_time")}, indent=2))
    return result


if __name__ == "__main__":
    main()
