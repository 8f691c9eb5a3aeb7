"""One training job = one configuration: pre-train on an LT dataset, evaluate, stream metrics, survive interruption.

``train(cfg, run_dir)`` runs on one process or under DDP (one process per GPU, or several CPU
processes with gloo), set up from torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK; what the launch layer exports in a multi-task Slurm job) or from Slurm's
SLURM_PROCID/SLURM_NTASKS through submitit. The global batch ``cfg.train.batch_size`` is split
across ranks.

Reading order: :func:`train` builds the job (:func:`build_runtime`, :func:`build_data`,
:func:`build_model`, :func:`build_optimizer_and_weights`, :func:`resume`) and runs it
(:func:`run_epochs`, then :func:`finish`); one step is :func:`train_step`, per optimizer:

- ``sgd``: mean loss, backward, step.
- ``sam`` / ``rwsam`` (Liu et al., ICLR 2022, Alg. 1): the first pass's per-sample losses
  ``l_i`` give the ascent loss ``sum_i w_i l_i / sum_i w_i`` (global batch; ``w = 1`` for
  ``weighting: none``, i.e. SAM); ``SAM.first_step`` moves to ``w + e_w``; the second pass
  (``update_state=False``: no BN running-stat update, no MoCo momentum/queue update) gives the
  unweighted mean loss whose gradient ``SAM.second_step`` applies at ``w``. The weights only
  shape the perturbation.

Every ``kde_every`` epochs (``weighting: kde``) the current encoder's L2-normalised features of
the whole training set are computed under ``no_grad`` (sharded across ranks, all-gathered) and
give the weights (:func:`ltssl.optim.weights.kde_weights`); the same pass feeds the method's
``on_train_features`` hook (TASE) when it asks for it.

Outputs (rank 0): ``run_dir/config.yaml``, ``metrics.jsonl`` (one JSON object per line, flushed),
``checkpoints/`` (the last two, verified on load: :mod:`ltssl.checkpoint`), ``result.json``. Step lines carry
``weight_mean``/``weight_max``: the rwSAM ascent weights of the samples drawn since the previous
step line (1 without re-weighting); refresh lines carry the dataset-level
``dataset_weight_mean``/``dataset_weight_max`` (mean 1 by construction). A job started on a run
folder with a checkpoint resumes from it, mid-epoch too. SIGUSR2/SIGTERM handlers run only at
step boundaries (:mod:`ltssl.signals`), so :func:`checkpoint_now` always saves a consistent state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ltssl.checkpoint import CheckpointStore
from ltssl.config import Config, ConfigError, save_config, to_dict
from ltssl.data import prepare_dataset
from ltssl.eval import (accuracy, extract_features, group_accuracy, knn_predict, linear_report, per_class_accuracy,
                        world_size)
from ltssl.io import LineAppender, atomic_write_text
from ltssl.methods import method_class
from ltssl.models import build_backbone, check_backbone
from ltssl.optim import SAM, SampleWeights, build_optimizer, kde_weights, learning_rate
from ltssl.signals import BoundaryGate, held_at_boundaries
from ltssl.tracking import open_tracker

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # a dead rank fails the others instead of hanging them
EVAL_BATCH_SIZE = {"cuda": 512, "cpu": 64}  # feature passes; on the CPU small batches stay in cache (faster per image)

_ACTIVE: "Job | None" = None  # the job running in this process, for checkpoint_now
_LOADERS: dict[tuple, object] = {}  # FFCV loaders reused across train() calls in one process (see cached_loader)
_MAX_CACHED_LOADERS = 8


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: "loss is nan at epoch 3 step 17" (1-based epoch, step in epoch)."""


# ----------------------------------------------------------------------------- public helpers


def check_names(cfg: Config) -> None:
    """Raise (one line) if the backbone or method name is unknown or the method options clash.

    Cheap, no data, no model: the launch layer calls it before submitting. The messages list
    the registered names, e.g. ``method.name must be one of moco_v2, simclr, simsiam, supervised, got 'byol'``.
    """
    check_backbone(cfg.model.backbone)
    method_class(cfg)
    world = cfg.launch.nodes * (cfg.launch.gpus_per_node or cfg.launch.tasks_per_node)
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size must be divisible by the {world} processes of the job, got {cfg.train.batch_size}")


def checkpoint_now() -> bool:
    """Save the running job's state now (rank 0 writes ``checkpoints/last.pt``).

    Safe from a signal handler: training holds SIGUSR2/SIGTERM until a step boundary
    (:mod:`ltssl.signals`). Returns False when no job is running, True otherwise (on ranks
    other than 0 nothing is written: rank 0 holds the same model).
    """
    job = _ACTIVE
    if job is None:
        return False
    job.save_checkpoint()
    return True


# ----------------------------------------------------------------------------- distributed


def setup_distributed(device_kind: str) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, initialised_here) from the environment.

    torchrun-style RANK/WORLD_SIZE (+ MASTER_ADDR/MASTER_PORT, LOCAL_RANK) first; else, in a
    Slurm step with several tasks, submitit's TorchDistributedEnvironment exports them.
    Backend NCCL on GPU, gloo on CPU; the process group times out after PROCESS_GROUP_TIMEOUT.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        # deferred: only a multi-task Slurm step needs submitit, and this module is also imported
        # where submitit is not installed (benchmarks/gpu.py on a bare GPU machine)
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in env:
            raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set: cannot start torch.distributed")
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
    return rank, world, local_rank, True


def unwrap(model: nn.Module) -> nn.Module:
    """The Method inside ``model`` (which may be wrapped by torch.compile and/or DDP)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cached_loader(cls, beton, **kwargs):
    """``cls(beton, **kwargs)``, reused when this process built the same loader for the same file before.

    Every new FFCV Loader pays numba compilation in its first epoch (seconds); loaders are
    stateless across epochs (order and augmentation are seeded by epoch and step), so several
    jobs in one process (tests, in-process sweeps) can share them. The key holds the file's
    identity (inode, size, mtime), the arguments and the rank/world size.
    """
    stat = Path(beton).stat()
    key = (cls.__name__, str(Path(beton).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns,
           tuple(sorted((k, str(v)) for k, v in kwargs.items())),
           dist.get_rank() if dist.is_available() and dist.is_initialized() else 0, world_size())
    if key not in _LOADERS:
        while len(_LOADERS) >= _MAX_CACHED_LOADERS:
            _LOADERS.pop(next(iter(_LOADERS)))
        _LOADERS[key] = cls(beton, **kwargs)
    return _LOADERS[key]


# ----------------------------------------------------------------------------- the step


def weighted_ascent_loss(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_i w_i l_i / sum_i w_i`` over the global batch, as this rank's share of it.

    Under DDP the gradients are averaged over ranks, so the rank's term is multiplied by the
    world size; the weight sum is all-reduced so the normalisation is global.
    """
    if weights is None:
        return per_sample.mean()
    weights = weights.to(per_sample.dtype)
    total = weights.sum()
    world = world_size()
    if world > 1:
        total = total.detach().clone()
        dist.all_reduce(total)
    return (weights * per_sample).sum() * world / total


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, weights: torch.Tensor | None = None,
               *, autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the mean per-sample loss of the first pass (detached, scalar).

    ``model``: a Method (or DDP/compile around one); ``batch``: ``views`` (K tensors ``[B,3,S,S]``),
    ``label`` ``[B]``, ``index`` ``[B]``; ``optimizer``: SGD or :class:`SAM`; ``weights``: this rank's
    per-sample ascent weights ``[B]`` (None = unweighted); ``autocast``: a factory of the precision
    context of the forward passes. See the module docstring.
    """
    autocast = autocast or contextlib.nullcontext
    views = batch["views"]
    with autocast():
        per_sample = model(views, batch, update_state=True)
    loss = per_sample.float().mean()
    # gradients are zeroed, not freed: backward then accumulates into the same buffers at every step
    # instead of allocating them anew (a visible share of a CPU step; see benchmarks/results/step.json)
    optimizer.zero_grad(set_to_none=False)
    if isinstance(optimizer, SAM):
        weighted_ascent_loss(per_sample.float(), weights).backward()
        optimizer.first_step()
        optimizer.zero_grad(set_to_none=False)
        with autocast():
            perturbed = model(views, batch, update_state=False)
        perturbed.float().mean().backward()
        optimizer.second_step()
    else:
        loss.backward()
        optimizer.step()
    unwrap(model).end_step()
    return loss.detach()


# ----------------------------------------------------------------------------- state helpers


def rng_state() -> dict:
    """Every random generator's state (torch, numpy, python, CUDA when initialised), ``weights_only``-loadable."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """Append JSON lines to ``path``, flushed as written (the sweep driver tails it); no-op off rank 0.

    Each line also goes to ``tracker`` (:mod:`ltssl.tracking`), which :meth:`close` ends with the
    job's result (None when the job stops early).
    """

    def __init__(self, path: Path, enabled: bool, tracker=None):
        # whole lines only: after a full disk left a fragment, the next line (a resumed job's too) starts afresh
        self.fh = LineAppender(path) if enabled else None
        self.tracker = tracker

    def write(self, **fields) -> None:
        if self.fh is not None:
            fields.setdefault("time", time.time())
            self.fh.write(json.dumps(fields, allow_nan=True))
            if self.tracker is not None:
                self.tracker.log(fields)

    def close(self, result: dict | None = None) -> None:
        """Close the file and the tracker (idempotent: a second call does nothing)."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.close(result)


# ----------------------------------------------------------------------------- building the job


@dataclasses.dataclass
class Runtime:
    """Where this process trains: device, rank in the job, and the precision settings that apply there."""

    device: torch.device
    rank: int
    world: int
    local_rank: int
    owns_group: bool  # this process initialised the process group, so it destroys it at the end
    local_batch: int  # this rank's share of train.batch_size
    amp: bool  # bf16 autocast of the forward passes
    channels_last: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of a forward pass: bf16 autocast on this device (CUDA or CPU), or nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _on_device(setting: bool | None, on_cuda: bool) -> bool:
    """A precision setting (``train.amp``, ``train.channels_last``): None = on with CUDA only; else as given, CPU too."""
    return on_cuda if setting is None else setting


def build_runtime(cfg: Config) -> Runtime:
    """Pick the device, join the process group (see :func:`setup_distributed`), set the GPU's math modes.

    ``train.device: cuda`` without a CUDA device is a one-line ConfigError; ``train.amp`` and
    ``train.channels_last`` apply on the CPU too when set to true (bf16 autocast works there).
    """
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    rank, world, local_rank, owns_group = setup_distributed("cuda" if want_cuda else "cpu")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    on_cuda = device.type == "cuda"
    rt = Runtime(device, rank, world, local_rank, owns_group, cfg.train.batch_size // world,
                 amp=_on_device(cfg.train.amp, on_cuda), channels_last=_on_device(cfg.train.channels_last, on_cuda))
    if cfg.train.batch_size % world:
        rt.close()
        raise ConfigError(f"train.batch_size must be divisible by the world size {world}, got {cfg.train.batch_size}")
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        # torch starts a thread per core of the node, not per CPU of this task: tasks that share a
        # node then spin against each other (a local sweep sets OMP_NUM_THREADS for its jobs instead)
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    if on_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rt


def build_data(cfg: Config, rt: Runtime, gate: BoundaryGate):
    """The prepared dataset (:class:`ltssl.data.PreparedDataset`) and its training loader (this rank's shard).

    Rank 0 prepares (idempotent, atomic); the others wait, then find it cached.
    """
    # deferred: the loaders sit on FFCV, which this module's importers without FFCV (benchmarks/gpu.py
    # on a bare GPU machine) never need
    from ltssl.data.resident import ssl_loader

    if rt.is_main:
        data = prepare_dataset(cfg.data)
    rt.barrier()
    if not rt.is_main:
        data = prepare_dataset(cfg.data)
    gate.open()  # a signal during preparation is handled now (no job yet: nothing to save)
    recipe = "imagenet" if cfg.data.dataset == "imagefolder" else "cifar"
    # data.resident: the set decoded once onto the device (ResidentLoader) or streamed (SSLLoader), same batches
    loader = cached_loader(ssl_loader, data.train_beton, batch_size=rt.local_batch, num_views=cfg.data.num_views,
                           image_size=data.image_size, recipe=recipe, seed=cfg.train.seed, distributed=rt.world > 1,
                           device=rt.device, num_workers=cfg.data.num_workers, resident=cfg.data.resident,
                           resident_max_mb=cfg.data.resident_max_mb, resident_compile=cfg.data.resident_compile)
    return data, loader


def _build_encoder(cfg: Config, image_size: int) -> nn.Module:
    return build_backbone(cfg.model, image_size)


def _no_forward_buffer_sync() -> dict:
    """DDP's keyword for "do not broadcast buffers at every forward" (renamed after torch 2.11)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def build_model(cfg: Config, rt: Runtime, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(method, model): the seeded Method on the device, and what the step calls (DDP and/or compile around it)."""
    seed_everything(cfg.train.seed)
    method = method_class(cfg)(cfg, _build_encoder(cfg, image_size), num_classes)
    if rt.device.type == "cuda" and rt.world > 1 and cfg.model.sync_bn and cfg.model.norm == "batch":
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method = method.to(rt.device)
    if rt.channels_last:
        method = method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if rt.world > 1:
        # buffers (BN statistics, MoCo's queue) are not broadcast every forward: the queue is the same on
        # every rank by construction, and BN statistics are synchronised before each evaluation.
        model = nn.parallel.DistributedDataParallel(method, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                                                    **_no_forward_buffer_sync())
    if cfg.train.compile:
        model = torch.compile(model)
    return method, model


def build_optimizer_and_weights(cfg: Config, method: nn.Module, data, device: torch.device) -> tuple[torch.optim.Optimizer, SampleWeights]:
    """SGD or SAM over the method's parameters, and rwSAM's per-sample ascent weights (scheme none for SGD/SAM)."""
    optimizer = build_optimizer(cfg.optim, method)
    scheme = cfg.optim.weighting if cfg.optim.name == "rwsam" else "none"
    return optimizer, SampleWeights(scheme, data.class_counts, data.n_train, device, cfg.optim.label_power_base)


def open_run_dir(cfg: Config, run_dir: Path, rt: Runtime) -> MetricsLog:
    """Rank 0 writes ``config.yaml``, makes ``checkpoints/`` and opens the trackers; every rank gets the metrics
    log (a no-op off rank 0)."""
    if not rt.is_main:
        return MetricsLog(run_dir / "metrics.jsonl", enabled=False)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return MetricsLog(run_dir / "metrics.jsonl", enabled=True, tracker=open_tracker(cfg, run_dir))


# ----------------------------------------------------------------------------- evaluation


class KnnResult(NamedTuple):
    """The kNN monitor's accuracy and predictions, with the features it used (the final report reuses them)."""

    acc: float
    preds: torch.Tensor  # [M] predicted test labels
    bank: tuple[torch.Tensor, torch.Tensor]  # probe-set features [N, D] and labels [N]
    test: tuple[torch.Tensor, torch.Tensor]  # test-set features [M, D] and labels [M]


class Evaluator:
    """Feature passes of the job's encoder: training-set features, the kNN monitor, the final report.

    Signals are handled between evaluation batches. Buffers (BN statistics) are taken from rank 0
    before each pass, so every rank evaluates the same encoder.
    """

    def __init__(self, cfg: Config, rt: Runtime, data, method: nn.Module, gate: BoundaryGate):
        self.cfg, self.rt, self.data, self.method, self.gate = cfg, rt, data, method, gate
        self._loaders: dict[str, object] = {}

    def _loader(self, key: str, beton):
        # deferred for the reason given in build_data
        from ltssl.data.ffcv import EvalLoader

        if key not in self._loaders:  # built once: every new FFCV loader pays numba compilation
            self._loaders[key] = cached_loader(EvalLoader, beton, batch_size=EVAL_BATCH_SIZE[self.rt.device.type],
                                               device=self.rt.device, num_workers=self.cfg.data.num_workers,
                                               distributed=self.rt.world > 1)
        return self._loaders[key]

    def sync_buffers(self) -> None:
        """Rank 0's buffers everywhere (BN statistics differ across ranks without SyncBatchNorm)."""
        if self.rt.world > 1:
            for buf in self.method.buffers():
                dist.broadcast(buf, 0)

    def features(self, key: str, beton) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised features ``[N, D]`` and labels ``[N]`` of the file ``beton``, row i = sample i."""
        return extract_features(self.method.encoder, self.gate.between(self._loader(key, beton)), self.rt.device,
                                amp=self.rt.amp, channels_last=self.rt.channels_last)

    def train_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.sync_buffers()
        return self.features("train", self.data.train_beton)

    def knn(self) -> KnnResult:
        """Weighted kNN of the balanced test set against the balanced probe set (accuracy in [0, 1])."""
        self.sync_buffers()
        bank = self.features("probe", self.data.probe_beton)
        test = self.features("test", self.data.test_beton)
        preds = knn_predict(*bank, test[0], self.data.num_classes, k=self.cfg.eval.knn_k,
                            temperature=self.cfg.eval.knn_temperature)
        return KnnResult(accuracy(preds, test[1]), preds, bank, test)

    def final(self) -> dict:
        """kNN, linear probe (overall, per class, many/medium/few) and the out-of-domain probe: the result's metrics."""
        cfg, data = self.cfg, self.data
        knn = self.knn()
        out = {"knn_acc": knn.acc}
        if cfg.eval.linear_epochs > 0:
            out.update(linear_report(knn.bank, knn.test, data.num_classes, cfg.eval, data.groups, seed=cfg.train.seed))
        else:  # no probe: the class-level figures come from the kNN predictions
            out.update(linear_acc=None, per_class_acc=per_class_accuracy(knn.preds, knn.test[1], data.num_classes))
            out.update(group_accuracy(knn.preds, knn.test[1], data.groups))
        for name in ("many", "medium", "few"):
            out.setdefault(f"acc_{name}", None)
        out["ood_linear_acc"] = None
        ood = getattr(data, "ood", None)
        if ood is not None and cfg.eval.linear_epochs > 0:
            ood_train = self.features("ood_probe", ood.probe_beton)
            ood_test = self.features("ood_test", ood.test_beton)
            out["ood_linear_acc"] = linear_report(ood_train, ood_test, ood.num_classes, cfg.eval, None, seed=cfg.train.seed)["linear_acc"]
        self.gate.open()
        return out


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Job:
    """One running job: the parts the build_* functions made, and where training stands.

    A checkpoint is :meth:`state`; everything else is rebuilt from the configuration.
    """

    cfg: Config
    run_dir: Path
    rt: Runtime
    data: Any  # ltssl.data.PreparedDataset
    loader: Any  # ltssl.data.ffcv.SSLLoader: .epoch(epoch, start_step) yields batches
    method: nn.Module
    model: nn.Module  # what the step calls: the method, or DDP/compile around it
    optimizer: torch.optim.Optimizer
    weights: SampleWeights
    evaluator: Evaluator
    log: MetricsLog
    store: CheckpointStore
    epoch: int = 0  # current epoch, 0-based
    step_in_epoch: int = 0  # steps done in the current epoch
    global_step: int = 0
    train_time: float = 0.0  # seconds of training in earlier attempts
    last_loss: float = math.nan
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    attempt_start: float = dataclasses.field(default_factory=time.time)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def state(self) -> dict:
        """Everything a resumed job needs to continue exactly (``torch.load(weights_only=True)``-loadable)."""
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"steps_per_epoch": self.steps_per_epoch},
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "train_time_s": self.train_time + (time.time() - self.attempt_start),
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "last_loss": self.last_loss,
            "weights": self.weights.state_dict(),
            "rng": rng_state(),
            "world_size": self.rt.world,
            "config": to_dict(self.cfg),
        }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`; refuses a checkpoint whose epochs have another number of steps."""
        if state["schedule"]["steps_per_epoch"] != self.steps_per_epoch:
            raise RuntimeError(
                f"{self.store.folder}: {state['schedule']['steps_per_epoch']} steps per epoch, this job has {self.steps_per_epoch} "
                "(the global batch, data or world size changed)"
            )
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weights.load_state_dict(state["weights"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.train_time = state["train_time_s"]
        self.epoch_loss_sum, self.epoch_loss_count = state["epoch_loss_sum"], state["epoch_loss_count"]
        self.last_loss = state["last_loss"]
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Rank 0 writes the state (the other ranks hold the same model)."""
        if self.rt.is_main:
            self.store.save(self.state())


def resume(job: Job) -> None:
    """Continue from the run folder's checkpoint, if there is one (mid-epoch too), and say so in metrics.jsonl."""
    state = job.store.load()
    if state is None:
        return
    job.restore(state)
    job.log.write(epoch=job.epoch + (1 if job.step_in_epoch else 0), step=job.global_step, resumed=True,
                  step_in_epoch=job.step_in_epoch)


# ----------------------------------------------------------------------------- the loop


class StepWindow:
    """The steps since the last step line: their losses (checked for NaN), images and ascent-weight statistics."""

    def __init__(self, device: torch.device):
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (epoch, step in epoch, loss) per step
        # ascent weights of the samples drawn: sum, count, max (1 without re-weighting)
        self.wstats = torch.tensor([0.0, 0.0, 0.0], device=device)
        self.restart()

    def restart(self) -> None:
        """Start timing the throughput window now."""
        self.start, self.images = time.time(), 0

    def add(self, epoch: int, step: int, loss: torch.Tensor, batch: dict, weights: torch.Tensor | None, images: int) -> None:
        self.pending.append((epoch, step, loss))
        self.images += images
        if weights is None:
            n = float(batch["index"].shape[0])
            self.wstats += torch.tensor([n, n, 0.0], device=self.wstats.device)
            self.wstats[2] = torch.clamp(self.wstats[2], min=1.0)
        else:
            w = weights.detach().float()
            self.wstats[0] += w.sum()
            self.wstats[1] += w.numel()
            self.wstats[2] = torch.maximum(self.wstats[2], w.max())

    def check_losses(self, values: torch.Tensor | None = None) -> None:
        """Raise NonFiniteLossError at the first non-finite pending loss (or of ``values``, their global means)."""
        if not self.pending:
            return
        values = (torch.stack([loss for _, _, loss in self.pending]) if values is None else values).cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            epoch, step, _ = self.pending[i]
            raise NonFiniteLossError(f"loss is {values[i].item()} at epoch {epoch + 1} step {step + 1}")
        self.pending.clear()

    def close(self, world: int) -> tuple[torch.Tensor, float, float, float]:
        """(global mean loss per pending step, weight mean, weight max, images/s); checks the losses, starts a new window.

        Under DDP every rank takes part: a NaN on any rank stops every rank here.
        """
        losses = torch.stack([p[2] for p in self.pending]).float()
        if world > 1:
            dist.all_reduce(losses)
            losses /= world
            dist.all_reduce(self.wstats[:2])
            dist.all_reduce(self.wstats[2:], op=dist.ReduceOp.MAX)
        self.check_losses(losses)
        weight_mean, weight_max = float(self.wstats[0] / self.wstats[1]), float(self.wstats[2])
        self.wstats.zero_()
        images_per_s = self.images / max(time.time() - self.start, 1e-9)
        self.restart()
        return losses, weight_mean, weight_max, images_per_s


def refresh_train_features(job: Job) -> None:
    """KDE weights and/or the method's feature hook, at the start of an epoch when due; logs a refresh line."""
    cfg, weights = job.cfg, job.weights
    kde_due = weights.scheme == "kde" and job.epoch % cfg.optim.kde_every == 0 and weights.kde_epoch != job.epoch
    method_due = job.method.wants_train_features(job.epoch)
    if not (kde_due or method_due):
        return
    start = time.time()
    feats, labels = job.evaluator.train_features()
    feature_time = time.time() - start
    if kde_due:
        weights.set_kde(kde_weights(feats, cfg.optim.kde_bandwidth, cfg.optim.kde_alpha), job.epoch)
    if method_due:
        job.method.on_train_features(feats, labels, job.epoch)
    stats = weights.stats()
    job.log.write(epoch=job.epoch + 1, step=job.global_step, kde_refresh=kde_due, train_features_s=feature_time,
                  refresh_s=time.time() - start, dataset_weight_mean=stats["weight_mean"], dataset_weight_max=stats["weight_max"])


def write_step_line(job: Job, window: StepWindow, lr: float) -> None:
    """The step line of the window's steps: mean loss, lr, images/s, ascent-weight mean and max."""
    losses, weight_mean, weight_max, images_per_s = window.close(job.rt.world)
    job.last_loss = float(losses[-1])
    job.epoch_loss_sum += float(losses.sum())
    job.epoch_loss_count += len(losses)
    job.log.write(epoch=job.epoch + 1, step=job.global_step, loss=float(losses.mean()), lr=lr, images_per_s=images_per_s,
                  weight_mean=weight_mean, weight_max=weight_max)


def end_epoch(job: Job, window: StepWindow) -> None:
    """Close the epoch: kNN monitor line when due, checkpoint when due."""
    cfg = job.cfg
    window.check_losses()
    epoch_loss = job.epoch_loss_sum / max(1, job.epoch_loss_count)
    job.epoch += 1
    job.step_in_epoch = 0
    job.epoch_loss_sum, job.epoch_loss_count = 0.0, 0
    if cfg.train.eval_every and job.epoch % cfg.train.eval_every == 0 and job.epoch < cfg.train.epochs:
        job.log.write(epoch=job.epoch, step=job.global_step, knn_acc=job.evaluator.knn().acc, epoch_loss=epoch_loss)
    if job.epoch % cfg.train.checkpoint_every == 0 or job.epoch == cfg.train.epochs:
        job.save_checkpoint()


def run_epochs(job: Job, gate: BoundaryGate, step_hook: Callable[[dict], None] | None = None) -> None:
    """Train from where ``job`` stands to ``train.epochs``. Signals are handled at every ``gate.open()``."""
    cfg = job.cfg
    sam = isinstance(job.optimizer, SAM)
    window = StepWindow(job.rt.device)
    while job.epoch < cfg.train.epochs:
        refresh_train_features(job)
        gate.open()
        window.restart()  # step throughput counts steps only: the refresh has its own line (refresh_s)
        for batch in job.loader.epoch(job.epoch, job.step_in_epoch):
            lr = learning_rate(cfg.optim, job.global_step, job.steps_per_epoch, cfg.train.epochs)
            for group in job.optimizer.param_groups:
                group["lr"] = lr
            if job.rt.channels_last:
                batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
            weights = job.weights.batch_weights(batch) if sam else None
            loss = train_step(job.model, job.optimizer, batch, weights, autocast=job.rt.autocast)
            window.add(job.epoch, job.step_in_epoch, loss, batch, weights, images=cfg.train.batch_size)
            job.step_in_epoch += 1
            job.global_step += 1
            if job.global_step % cfg.train.log_every == 0 or job.step_in_epoch == job.steps_per_epoch:
                write_step_line(job, window, lr)
            gate.open()
            if step_hook is not None:
                step_hook({"epoch": job.epoch, "step_in_epoch": job.step_in_epoch, "global_step": job.global_step})
        end_epoch(job, window)
        gate.open()


def finish(job: Job) -> dict:
    """The final evaluation; rank 0 writes the final metrics line and ``result.json``. Returns the result."""
    train_time = job.train_time + (time.time() - job.attempt_start)
    result = job.evaluator.final()
    data = job.data
    result.update(epochs_run=job.epoch, train_time_s=train_time, n_train=data.n_train, num_classes=data.num_classes,
                  class_counts=list(data.class_counts), world_size=job.rt.world, final_loss=job.last_loss)
    if job.rt.is_main:
        job.log.write(epoch=job.epoch, step=job.global_step, final=True, **result)
        atomic_write_text(job.run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def train(cfg: Config, run_dir, *, step_hook: Callable[[dict], None] | None = None) -> dict:
    """Pre-train, evaluate and return the result dict (the keys of ``result.json``); resumes from ``run_dir/checkpoints``.

    ``step_hook(info)``, if given, is called after every step at the step boundary with
    ``{"epoch": 0-based, "step_in_epoch": steps done, "global_step"}`` (tests interrupt runs with it).
    Raises :class:`NonFiniteLossError` on a NaN/inf loss, ``ConfigError``/``UnknownNameError`` on bad names.
    """
    global _ACTIVE
    check_backbone(cfg.model.backbone)  # check_names minus the batch/world check: the real world size comes later
    method_class(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with held_at_boundaries() as gate, contextlib.ExitStack() as cleanup:
        try:
            rt = build_runtime(cfg)
            cleanup.callback(rt.close)
            data, loader = build_data(cfg, rt, gate)
            method, model = build_model(cfg, rt, data.image_size, data.num_classes)
            optimizer, weights = build_optimizer_and_weights(cfg, method, data, rt.device)
            log = open_run_dir(cfg, run_dir, rt)
            cleanup.callback(log.close)  # result None: the job stops early (no-op after the close below)
            job = Job(cfg, run_dir, rt, data, loader, method, model, optimizer, weights,
                      Evaluator(cfg, rt, data, method, gate), log,
                      CheckpointStore(run_dir / "checkpoints", restart_on_corrupt=cfg.train.restart_on_corrupt_checkpoint))
            resume(job)
            _ACTIVE = job
            result_path = run_dir / "result.json"
            if job.epoch >= cfg.train.epochs and result_path.exists():  # a finished job started again
                result = json.loads(result_path.read_text())
            else:
                run_epochs(job, gate, step_hook)
                result = finish(job)
            log.close(result)
            return result
        except BaseException:
            # an epoch left unfinished may still have an FFCV thread writing into its loader's buffers
            # (EpochIterator.close() does not join it): never hand such a loader to a later job
            _LOADERS.clear()
            raise
        finally:
            _ACTIVE = None
