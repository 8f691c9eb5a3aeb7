#!/usr/bin/env python
"""The device check: ltssl's training path measured on one accelerator, data resident on it, in one command.

    python benchmarks/gpu.py                          # one CUDA GPU: about 5 minutes; writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu --quick     # the same sections, small, on the CPU (a test runs it)
    python benchmarks/gpu.py --sections augmentation,end_to_end   # only those (names as listed below)

Needs Python, torch, torchvision, numpy, PyYAML and scikit-learn (digits) only: no FFCV, Ray, submitit
or network (it imports no ltssl module that imports them). It builds a CIFAR-shaped long-tailed set
in memory (CIFAR-10-LT profile, ratio 100: 12,406 structured random 32 px images) and measures:

- ``augmentation``: :class:`ltssl.data.resident.ResidentLoader` on the device, two views per image
  (index gather + the SimSiam CIFAR recipe on the device): images/s over whole epochs, as the loader
  runs by default on the device and side by side its torch path eager and torch.compile'd (compile
  time, compiled vs eager difference, and the host's share: drawing + copying the parameters).
- ``steps``: SimSiam / SimCLR / MoCo v2 on the CIFAR ResNet-18, 32 px, two views, the real training
  step (:func:`ltssl.train.train_step`) with SGD, SAM, rwSAM (label_power, kde), each in fp32, fp32 +
  channels_last, bf16 autocast, bf16 + channels_last: median step time, images/s, the ratio to SGD in
  the same method and precision, peak device memory.
- ``compile``: SimSiam with SGD and rwSAM (label_power), bf16 + channels_last, eager vs torch.compile:
  compile time (first steps) and step time after it.
- ``end_to_end``: SimSiam + SGD, bf16 + channels_last, fed by the resident loader (default, eager and
  compiled augmentation): images/s.
- ``kde_refresh``: the rwSAM KDE refresh: the feature pass over 50k images and the density of 50k
  features (:func:`ltssl.optim.kde_weights`).
- ``ddp``: one-process DistributedDataParallel steps (NCCL on CUDA, gloo on CPU), SGD and rwSAM.
- ``digits``: a short SimSiam run on long-tailed scikit-learn digits on the device and on the CPU,
  several seeds each: kNN accuracy on the balanced digits test set, side by side.

Figures land in ``--out`` (JSON). ``--quick`` shrinks every size so that the CPU runs it in about a
minute: the small CNN instead of ResNet-18, batch 8, two precision modes, and ``aot_eager``
compilation (the compile plumbing without C++ code generation).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import socket
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from ltssl.config import load_config  # noqa: E402
from ltssl.data.augment import draw_params, generator_for, get_recipe, pack_params  # noqa: E402
from ltssl.data.longtail import class_counts, longtail_subset  # noqa: E402
from ltssl.data.resident import ResidentLoader  # noqa: E402
from ltssl.data.sources import load_digits_source  # noqa: E402
from ltssl.eval import accuracy, extract_features, knn_predict  # noqa: E402
from ltssl.io import atomic_write_text  # noqa: E402
from ltssl.optim import kde_weights  # noqa: E402
from ltssl.train import Runtime, build_model, build_optimizer_and_weights, train_step  # noqa: E402

METHODS = ("simsiam", "simclr", "moco_v2")
OPTIMIZERS = {"sgd": {"optim.name": "sgd"}, "sam": {"optim.name": "sam"},
              "rwsam_label_power": {"optim.name": "rwsam", "optim.weighting": "label_power"},
              "rwsam_kde": {"optim.name": "rwsam", "optim.weighting": "kde"}}
MODES = {"fp32": (False, False), "fp32_channels_last": (False, True), "bf16": (True, False), "bf16_channels_last": (True, True)}
CIFAR_MEAN, CIFAR_STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SECTIONS = ("augmentation", "steps", "end_to_end", "kde_refresh", "ddp", "digits", "compile")
GOALS = {"simsiam_sgd_bf16_channels_last_images_per_s": 20000, "rwsam_step_ratio_to_sgd": 2.1,
         "augmentation_images_per_s": 200000, "kde_refresh_s_50k": 1.0}


@dataclass
class Sizes:
    """Everything --quick shrinks."""

    n_max: int = 5000            # CIFAR-10-LT head class; ratio 100 gives 12,406 images
    backbone: str = "resnet18_cifar"
    batch: int = 512
    warmup: int = 5
    steps: int = 20
    proj_dim: int = 2048
    kde_features: int = 50000
    feature_images: int = 50000
    digits_epochs: int = 30
    digits_seeds: int = 3
    compile_backend: str = "inductor"
    modes: tuple[str, ...] = tuple(MODES)
    end_to_end_steps: int | None = None  # None: a whole epoch
    threads: int | None = None  # torch CPU threads; None: torch's default


QUICK = Sizes(n_max=200, backbone="small_cnn", batch=8, warmup=1, steps=1, proj_dim=128, kde_features=4000, feature_images=256,
              digits_epochs=2, digits_seeds=2, compile_backend="aot_eager", modes=("fp32", "bf16_channels_last"),
              end_to_end_steps=2, threads=1)  # one thread: a loaded CI machine stalls OpenMP barriers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of ``fn()``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """Peak device memory since the last reset (CUDA), or the process's peak resident set (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- data


def cifar_lt(sizes: Sizes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """CIFAR-shaped LT set: uint8 [N,3,32,32] (smooth colour gradients + noise) on ``device``, labels [N], counts."""
    counts = class_counts(sizes.n_max, 10, 100.0)
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))
    gen = torch.Generator().manual_seed(0)
    n = len(labels)
    ramp = torch.linspace(0, 1, 32)
    base = (torch.rand(n, 3, 1, 1, generator=gen) * ramp.view(1, 1, 32, 1)
            + torch.rand(n, 3, 1, 1, generator=gen) * ramp.view(1, 1, 1, 32)) / 2 + 0.25
    images = ((base + 0.1 * torch.randn(n, 3, 32, 32, generator=gen)).clamp(0, 1) * 255).to(torch.uint8)
    return images.to(device), labels.to(device), counts


def resident(images, labels, sizes: Sizes, device, *, batch=None, seed=0, **kw) -> ResidentLoader:
    return ResidentLoader(images, labels, batch_size=batch or sizes.batch, num_views=2, image_size=32, recipe="cifar",
                          seed=seed, mean=CIFAR_MEAN, std=CIFAR_STD, device=device, **kw)


def augmentation_loaders(images, labels, sizes: Sizes, device) -> dict:
    """The loader as it runs by default on ``device``, and its torch path eager and compiled (``sizes.compile_backend``,
    failures raise); the three share seeds, so their batches agree to float rounding."""
    # compiled before default: the compile time lands in the compiled side's first batch, and the default (the
    # same compiled function on CUDA) shows that a second loader of the same shapes does not compile again
    return {"eager": resident(images, labels, sizes, device, fused=False, compile=False),
            "compiled": resident(images, labels, sizes, device, fused=False, compile=sizes.compile_backend),
            "default": resident(images, labels, sizes, device)}


def bench_augmentation(images, labels, sizes: Sizes, device) -> dict:
    """Images/s of whole resident-loader epochs (two views each), after one warm-up epoch (its first batch compiles),
    for each of :func:`augmentation_loaders`; ``images_per_s`` is the default's."""
    out = {"views_per_image": 2, "batch_size": sizes.batch, "n_train": int(len(labels)), "compile_backend": sizes.compile_backend}
    firsts = {}
    for name, loader in augmentation_loaders(images, labels, sizes, device).items():
        try:
            firsts[name], first_s = timed(lambda: next(iter(loader.epoch(0))), device)  # noqa: B023
            list(loader.epoch(0))
            n, secs = timed(lambda: sum(len(b["index"]) for e in (1, 2) for b in loader.epoch(e)), device)  # noqa: B023
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result; the other sides still run
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"augmentation {name}: failed: {out[f'{name}_error'][:300]}", flush=True)
            continue
        out.update({f"{name}_images_per_s": n / secs, f"{name}_seconds": secs, f"{name}_images": n,
                    f"{name}_first_batch_s": first_s, f"{name}_pixels": loader.pixels})
        if loader.compile_error:
            out[f"{name}_compile_error"] = loader.compile_error[:2000]
        print(f"augmentation {name} ({loader.pixels}): {n / secs:.0f} images/s, first batch {first_s:.2f} s", flush=True)
    out.update(images_per_s=out.get("default_images_per_s", 0.0), images=out.get("default_images", 0),
               seconds=out.get("default_seconds", 0.0))
    if "compiled_first_batch_s" in out:
        out["compile_s"] = out["compiled_first_batch_s"]
    if "eager" in firsts and "compiled" in firsts:  # the same draws: the pixels agree to float rounding
        out["compiled_vs_eager_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in
                                                    zip(firsts["eager"]["views"], firsts["compiled"]["views"]))
    # the host's share of a batch: drawing every parameter on the CPU and the one copy to the device
    recipe, reps = get_recipe("cifar"), max(3, sizes.steps)
    _, host_s = timed(lambda: [pack_params(draw_params(generator_for(0, 0, i, 0), sizes.batch, 32, 32, recipe, 2), device)
                               for i in range(reps)], device)
    out["host_draw_and_copy_ms_per_batch"] = host_s / reps * 1e3
    return out


# ----------------------------------------------------------------------------- steps


def build(method: str, optimizer: str, sizes: Sizes, device, counts, *, amp: bool, channels_last: bool, backbone=None,
          seed=0, lr=None):
    """(Runtime, method, optimizer, weights) through ltssl.train's builders."""
    overrides = {"model.backbone": backbone or sizes.backbone, "data.image_size": 32, "method.name": method, "method.proj_dim": sizes.proj_dim,
                 "method.proj_hidden_dim": sizes.proj_dim, "train.seed": seed, **OPTIMIZERS[optimizer]}
    if lr is not None:
        overrides["optim.lr"] = lr
    cfg = load_config(overrides=overrides)
    rt = Runtime(device, 0, 1, 0, False, sizes.batch, amp=amp, channels_last=channels_last)
    method_, _ = build_model(cfg, rt, 32, len(counts))
    data = SimpleNamespace(class_counts=list(counts), n_train=int(sum(counts)))
    opt, weights = build_optimizer_and_weights(cfg, method_, data, device)
    if weights.scheme == "kde":
        weights.set_kde(torch.rand(data.n_train, generator=torch.Generator().manual_seed(1)) + 0.5, epoch=0)
    return rt, method_, opt, weights


def as_format(batch: dict, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {**batch, "views": [v.contiguous(memory_format=fmt) for v in batch["views"]]}


def step_fn(rt: Runtime, model: nn.Module, opt, weights, batch: dict):
    return lambda: train_step(model, opt, batch, weights.batch_weights(batch) if weights.scheme != "none" else None,
                              autocast=rt.autocast)


def time_steps(fn, sizes: Sizes, device) -> dict:
    """Warm-up steps, then the median of ``sizes.steps`` timed steps; the first step's time and the last loss too."""
    first = timed(fn, device)[1]
    for _ in range(sizes.warmup - 1):
        fn()
    runs = [timed(fn, device) for _ in range(sizes.steps)]
    median = statistics.median(t for _, t in runs)
    return {"step_s": median, "images_per_s": sizes.batch / median, "first_step_s": first, "final_loss": float(runs[-1][0])}


def bench_steps(batch: dict, sizes: Sizes, device, counts) -> dict:
    """Every method x optimizer x precision mode; ratios to SGD within a method and mode."""
    out: dict = {}
    for method in METHODS:
        for mode in sizes.modes:
            amp, cl = MODES[mode]
            row = {}
            for opt_name in OPTIMIZERS:
                reset_peak(device)
                rt, model, opt, weights = build(method, opt_name, sizes, device, counts, amp=amp, channels_last=cl)
                row[opt_name] = time_steps(step_fn(rt, model, opt, weights, as_format(batch, cl)), sizes, device)
                row[opt_name]["peak_memory_mib"] = peak_mib(device)
                del model, opt, weights
            for opt_name in OPTIMIZERS:
                row[opt_name]["ratio_to_sgd"] = row[opt_name]["step_s"] / row["sgd"]["step_s"]
            out.setdefault(method, {})[mode] = row
            print(f"steps {method:8s} {mode:19s} " + " ".join(f"{k}={v['images_per_s']:.0f}/s" for k, v in row.items()),
                  flush=True)
    return out


def bench_compile(batch: dict, sizes: Sizes, device, counts) -> dict:
    """SimSiam with SGD and rwSAM (label_power), bf16 + channels_last, eager vs torch.compile (compile time = first steps)."""
    out = {"backend": sizes.compile_backend, "mode": "bf16_channels_last"}
    for opt_name in ("sgd", "rwsam_label_power"):
        row = {}
        for compiled in (False, True):
            reset_peak(device)
            rt, method, opt, weights = build("simsiam", opt_name, sizes, device, counts, amp=True, channels_last=True)
            model = torch.compile(method, backend=sizes.compile_backend) if compiled else method
            fn = step_fn(rt, model, opt, weights, as_format(batch, True))
            # rwSAM's two passes (update_state True / False) are two graphs: both compile in the first step
            _, compile_s = timed(lambda: [fn() for _ in range(2)], device)
            res = time_steps(fn, sizes, device)
            res.update(first_two_steps_s=compile_s, peak_memory_mib=peak_mib(device))
            row["compiled" if compiled else "eager"] = res
        row["speedup"] = row["eager"]["step_s"] / row["compiled"]["step_s"]
        out[opt_name] = row
        print(f"compile {opt_name}: eager {row['eager']['step_s'] * 1e3:.1f} ms, compiled {row['compiled']['step_s'] * 1e3:.1f} ms, "
              f"first two steps {row['compiled']['first_two_steps_s']:.1f} s", flush=True)
    return out


def bench_end_to_end(images, labels, sizes: Sizes, device, counts) -> dict:
    """SimSiam + SGD (bf16 + channels_last) fed by the resident loader: images/s over one epoch after a warm-up, with the
    loader's default augmentation (``images_per_s``) and its eager and compiled torch paths."""
    rt, model, opt, weights = build("simsiam", "sgd", sizes, device, counts, amp=True, channels_last=True)
    out = {"method": "simsiam", "optimizer": "sgd", "mode": "bf16_channels_last"}
    for name, loader in augmentation_loaders(images, labels, sizes, device).items():
        def epoch(e, limit=None):
            n = 0
            for i, batch in enumerate(loader.epoch(e)):  # noqa: B023
                if limit is not None and i >= limit:
                    break
                train_step(model, opt, as_format(batch, True), None, autocast=rt.autocast)
                n += len(batch["index"])
            return n

        try:
            epoch(0, limit=sizes.warmup)
            n, secs = timed(lambda: epoch(1, limit=sizes.end_to_end_steps), device)  # noqa: B023
        except Exception as exc:  # noqa: BLE001 - as in bench_augmentation
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        out.update({f"{name}_images_per_s": n / secs, f"{name}_seconds": secs, f"{name}_images": n, f"{name}_pixels": loader.pixels})
        print(f"end_to_end {name} ({loader.pixels}): {n / secs:.0f} images/s", flush=True)
    out.update(images_per_s=out.get("default_images_per_s", 0.0), images=out.get("default_images", 0),
               seconds=out.get("default_seconds", 0.0))
    return out


# ----------------------------------------------------------------------------- KDE, DDP


def bench_kde(sizes: Sizes, device, counts) -> dict:
    """The rwSAM KDE refresh: feature pass (eval mode, bf16 on CUDA) over ``feature_images`` and the density of
    ``kde_features`` L2-normalised 512-d features."""
    _, method, _, _ = build("simsiam", "rwsam_kde", sizes, device, counts, amp=True, channels_last=True)
    gen = torch.Generator().manual_seed(2)
    n_img, bs = sizes.feature_images, sizes.batch
    images = torch.randn(n_img, 3, 32, 32, generator=gen).to(device)
    batches = [{"image": images[i:i + bs], "label": torch.zeros(min(bs, n_img - i), dtype=torch.long, device=device),
                "index": torch.arange(i, min(i + bs, n_img), device=device)} for i in range(0, n_img, bs)]
    cuda = device.type == "cuda"
    extract_features(method.encoder, batches[:1], device, amp=cuda, channels_last=cuda)  # warm-up
    (feats, _), feature_s = timed(lambda: extract_features(method.encoder, batches, device, amp=cuda, channels_last=cuda), device)
    features = torch.nn.functional.normalize(torch.randn(sizes.kde_features, feats.shape[1], generator=gen), dim=1).to(device)
    kde_weights(features[:256], bandwidth=0.5, alpha=1.0)  # warm-up
    w, density_s = timed(lambda: kde_weights(features, bandwidth=0.5, alpha=1.0), device)
    assert w.shape == (sizes.kde_features,) and bool(torch.isfinite(w).all())
    return {"feature_images": n_img, "feature_pass_s": feature_s, "feature_images_per_s": n_img / feature_s,
            "kde_features": sizes.kde_features, "feature_dim": int(feats.shape[1]), "density_s": density_s,
            "refresh_s": feature_s + density_s}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_ddp(batch: dict, sizes: Sizes, device, counts) -> dict:
    """One-process DistributedDataParallel steps (NCCL on CUDA, gloo on CPU) vs the same step without DDP."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    out = {"backend": backend, "world_size": 1}
    try:
        for opt_name in ("sgd", "rwsam_label_power"):
            rt, method, opt, weights = build("simsiam", opt_name, sizes, device, counts, amp=True, channels_last=True)
            ddp = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
            b = as_format(batch, True)
            with_ddp = time_steps(step_fn(rt, ddp, opt, weights, b), sizes, device)
            plain = time_steps(step_fn(rt, method, opt, weights, b), sizes, device)
            out[opt_name] = {"ddp": with_ddp, "plain": plain, "ddp_overhead": with_ddp["step_s"] / plain["step_s"]}
    finally:
        dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=2)
def digits_data(device: torch.device) -> dict:
    """Long-tailed digits (ratio 10, 32 px) train set and the balanced digits test set, uint8 [N,3,32,32] on ``device``."""
    src = load_digits_source()
    sub = longtail_subset(src.train_labels, src.num_classes, 10.0, seed=0)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous().to(device)  # noqa: E731
    mean = (src.train_images.reshape(-1, 3).mean(0) / 255).tolist()
    std = (src.train_images.reshape(-1, 3).std(0) / 255).tolist()
    return {"train": to(src.train_images[sub.indices]), "train_labels": torch.from_numpy(src.train_labels[sub.indices]).to(device),
            "test": to(src.test_images), "test_labels": torch.from_numpy(src.test_labels).to(device),
            "counts": sub.counts, "mean": mean, "std": std}


def digits_run(device, sizes: Sizes, seed: int, *, amp: bool, channels_last: bool) -> float:
    """SimSiam (small CNN, SGD) on LT digits for ``digits_epochs``; kNN accuracy (k 20) on the digits test set."""
    d = digits_data(device)
    small = replace(sizes, batch=64, proj_dim=512)
    rt, method, opt, _ = build("simsiam", "sgd", small, device, d["counts"], amp=amp, channels_last=channels_last,
                               backbone="small_cnn", seed=seed, lr=0.05)
    loader = ResidentLoader(d["train"], d["train_labels"], batch_size=64, num_views=2, image_size=32, recipe="cifar", seed=seed,
                            mean=d["mean"], std=d["std"], device=device)
    for epoch in range(sizes.digits_epochs):
        for batch in loader.epoch(epoch):
            train_step(method, opt, as_format(batch, channels_last), None, autocast=rt.autocast)

    def plain(images, labels):
        x = (images.float() / 255 - torch.tensor(d["mean"], device=device).view(1, 3, 1, 1)) / torch.tensor(d["std"], device=device).view(1, 3, 1, 1)
        return [{"image": x[i:i + 256], "label": labels[i:i + 256], "index": torch.arange(i, min(i + 256, len(labels)), device=device)}
                for i in range(0, len(labels), 256)]

    bank, bank_labels = extract_features(method.encoder, plain(d["train"], d["train_labels"]), device, amp=amp, channels_last=channels_last)
    queries, query_labels = extract_features(method.encoder, plain(d["test"], d["test_labels"]), device, amp=amp, channels_last=channels_last)
    return accuracy(knn_predict(bank, bank_labels, queries, len(d["counts"])), query_labels)


def bench_digits(device, sizes: Sizes) -> dict:
    """The same short digits runs on the device (its fast precision) and on the CPU (fp32), ``digits_seeds`` seeds each."""
    cuda = device.type == "cuda"
    runs = {"device": {"device": str(device), "amp": cuda, "channels_last": cuda}, "cpu": {"device": "cpu", "amp": False, "channels_last": False}}
    for run in runs.values():
        t0 = time.perf_counter()
        run["knn_acc"] = [digits_run(torch.device(run["device"]), sizes, seed, amp=run["amp"], channels_last=run["channels_last"])
                          for seed in range(sizes.digits_seeds)]
        run["seconds"] = time.perf_counter() - t0
        run["mean"] = statistics.mean(run["knn_acc"])
        run["std"] = statistics.stdev(run["knn_acc"]) if len(run["knn_acc"]) > 1 else 0.0
    diff = runs["device"]["mean"] - runs["cpu"]["mean"]
    noise = math.sqrt((runs["device"]["std"] ** 2 + runs["cpu"]["std"] ** 2) / sizes.digits_seeds)
    print(f"digits kNN: device {runs['device']['knn_acc']} cpu {runs['cpu']['knn_acc']}", flush=True)
    return {**runs, "epochs": sizes.digits_epochs, "seeds": sizes.digits_seeds, "mean_difference": diff,
            "standard_error_of_difference": noise, "within_2_standard_errors": abs(diff) <= 2 * noise + 1e-12}


# ----------------------------------------------------------------------------- main


def goals(result: dict) -> dict:
    """Each goal measured by the sections that ran (a goal whose section did not run is left out)."""
    measured = {}
    if "end_to_end" in result:
        measured["simsiam_sgd_bf16_channels_last_images_per_s"] = result["end_to_end"]["images_per_s"]
    if "steps" in result:
        simsiam = result["steps"]["simsiam"]["bf16_channels_last"]
        measured["rwsam_step_ratio_to_sgd"] = max(simsiam["rwsam_label_power"]["ratio_to_sgd"], simsiam["rwsam_kde"]["ratio_to_sgd"])
    if "augmentation" in result:
        measured["augmentation_images_per_s"] = result["augmentation"]["images_per_s"]
    if "kde_refresh" in result:
        measured["kde_refresh_s_50k"] = result["kde_refresh"]["density_s"]
    met = {k: (v <= GOALS[k] if k in ("rwsam_step_ratio_to_sgd", "kde_refresh_s_50k") else v >= GOALS[k]) for k, v in measured.items()}
    return {"targets": GOALS, "measured": measured, "met": met}


def machine(device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    return info


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)} (default all)")
    args = ap.parse_args(argv)
    chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
    if not chosen or set(chosen) - set(SECTIONS):
        raise SystemExit(f"benchmarks/gpu.py: --sections {args.sections!r}: each name must be one of {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: --device cuda but no CUDA device is available (use --device cpu --quick here)")
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sizes = QUICK if args.quick else Sizes()
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    t_start = time.perf_counter()
    images, labels, counts = cifar_lt(sizes, device)
    # one training batch for the step sections, made only when one of them runs (eager: no compile for it)
    batch = functools.cache(lambda: next(iter(resident(images, labels, sizes, device, compile=False).epoch(0))))
    result = {"benchmark": "gpu", "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(device), "sizes": vars(sizes), "setup": {"n_train": int(len(labels)), "class_counts": counts,
              "image_size": 32, "views": 2, "backbone": sizes.backbone, "batch_size": sizes.batch}}
    sections = [("augmentation", lambda: bench_augmentation(images, labels, sizes, device)),
                ("steps", lambda: bench_steps(batch(), sizes, device, counts)),
                ("end_to_end", lambda: bench_end_to_end(images, labels, sizes, device, counts)),
                ("kde_refresh", lambda: bench_kde(sizes, device, counts)),
                ("ddp", lambda: bench_ddp(batch(), sizes, device, counts)),
                ("digits", lambda: bench_digits(device, sizes)),
                ("compile", lambda: bench_compile(batch(), sizes, device, counts))]
    assert [name for name, _ in sections] == list(SECTIONS)
    result["sections"] = chosen
    section_s = {}
    for name, fn in sections:
        if name not in chosen:
            continue
        t0 = time.perf_counter()
        result[name] = fn()
        section_s[name] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:6.1f} s] {name} done in {section_s[name]:.1f} s", flush=True)
        # written after every section: a run stopped at a time limit still leaves what it measured
        write_json(args.out, {**result, "section_s": section_s, "complete": False})
    result["goals"] = {**goals(result), "applies": device.type == "cuda" and not args.quick}  # the targets are for one H200
    result["section_s"] = section_s
    result["total_s"] = time.perf_counter() - t_start
    result["complete"] = True
    write_json(args.out, result)
    print(json.dumps({"goals": result["goals"], "total_s": result["total_s"]}, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
