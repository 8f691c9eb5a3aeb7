"""One training job = one configuration: pre-train on an LT dataset, evaluate, stream metrics, survive interruption.

``train(cfg, run_dir)`` runs on one process or under DDP (one process per GPU, or
several CPU processes with gloo), set up from torchrun-style variables (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK; what the launch layer exports
in a multi-task Slurm job) or from Slurm's SLURM_PROCID/SLURM_NTASKS through
submitit. The global batch ``cfg.train.batch_size`` is split across ranks.

The step (:func:`train_step`), per optimizer:

- ``sgd``: mean loss, backward, step.
- ``sam`` / ``rwsam`` (Liu et al., ICLR 2022, Alg. 1): the first pass's per-sample losses
  ``l_i`` give the ascent loss ``sum_i w_i l_i / sum_i w_i`` (global batch; ``w = 1`` for
  ``weighting: none``, i.e. SAM); ``SAM.first_step`` moves to ``w + e_w``; the second pass
  (``update_state=False``: no BN running-stat update, no MoCo momentum/queue update) gives the
  unweighted mean loss whose gradient ``SAM.second_step`` applies at ``w``. The weights only
  shape the perturbation.

Every ``kde_every`` epochs (``weighting: kde``) the current encoder's L2-normalised
features of the whole training set are computed under ``no_grad`` (sharded across ranks,
all-gathered) and give the weights (:func:`ltssl.optim.weights.kde_weights`); the same
pass feeds the method's ``on_train_features`` hook (TASE) when it asks for it.

Outputs (rank 0): ``run_dir/config.yaml``, ``metrics.jsonl`` (one JSON object per line,
flushed), ``checkpoints/last.pt`` (atomic; ``torch.load(weights_only=True)``), ``result.json``.
Step lines carry ``weight_mean``/``weight_max``: the rwSAM ascent weights of the samples drawn
since the previous step line (1 without re-weighting); refresh lines carry the dataset-level
``dataset_weight_mean``/``dataset_weight_max`` (mean 1 by construction).
A job started on a run folder with a checkpoint resumes from it, mid-epoch too.

Signals: the Python handlers of SIGUSR2 and SIGTERM run only at step boundaries (and
between evaluation batches), so a handler that calls :func:`checkpoint_now` always sees a
consistent state. Two layers make sure of it: the signals stay blocked in the calling thread
(threads started during training inherit the block), and, because a thread that existed
before ``train`` (OpenBLAS's pool, started when numpy is imported) can still take a
process-directed signal and make CPython run the handler mid-step, the handlers are wrapped
for the duration of ``train``: a signal that arrives between boundaries is held and handed to
the original handler at the next boundary (:class:`_BoundaryGate`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ltssl.config import Config, ConfigError, save_config, to_dict
from ltssl.io import atomic_torch_save, atomic_write_text
from ltssl.eval import accuracy, extract_features, group_accuracy, knn_predict, linear_report, per_class_accuracy
from ltssl.methods import method_class
from ltssl.models import check_backbone
from ltssl.optim import SAM, SampleWeights, build_optimizer, kde_weights, learning_rate

CHECKPOINT_SIGNALS = {signal.SIGUSR2, signal.SIGTERM}
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # a dead rank fails the others instead of hanging them
EVAL_BATCH_SIZE = {"cuda": 512, "cpu": 64}  # feature passes; on the CPU small batches stay in cache (~30% faster per image)

_ACTIVE: "Trainer | None" = None
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
    """Save the running trainer's state now (rank 0 writes ``checkpoints/last.pt``).

    Safe from a signal handler: the trainer blocks SIGUSR2/SIGTERM during steps, so the
    handler runs at a step boundary. Returns False when no trainer is running, True
    otherwise (on ranks other than 0 nothing is written: rank 0 holds the same model).
    """
    trainer = _ACTIVE
    if trainer is None:
        return False
    trainer.save_checkpoint()
    return True


# ----------------------------------------------------------------------------- distributed


def setup_distributed(device_kind: str) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, initialised_here) from the environment.

    torchrun-style RANK/WORLD_SIZE (+ MASTER_ADDR/MASTER_PORT, LOCAL_RANK) first; else, in a
    Slurm step with several tasks, submitit's TorchDistributedEnvironment exports them.
    Backend NCCL on GPU, gloo on CPU; the process group times out after 10 minutes.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
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


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrap(model: nn.Module) -> nn.Module:
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
           dist.get_rank() if dist.is_available() and dist.is_initialized() else 0, _world())
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
    world = _world()
    if world > 1:
        total = total.detach().clone()
        dist.all_reduce(total)
    return (weights * per_sample).sum() * world / total


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, weights: torch.Tensor | None = None,
               *, autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the mean per-sample loss of the first pass (detached).

    ``model``: a Method (or DDP around one); ``optimizer``: SGD or :class:`SAM`; ``weights``:
    this rank's per-sample ascent weights ``[B]`` (None = unweighted). See the module docstring.
    """
    autocast = autocast or contextlib.nullcontext
    views = batch["views"]
    with autocast():
        per_sample = model(views, batch, update_state=True)
    loss = per_sample.float().mean()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, SAM):
        weighted_ascent_loss(per_sample.float(), weights).backward()
        optimizer.first_step(zero_grad=True)
        with autocast():
            perturbed = model(views, batch, update_state=False)
        perturbed.float().mean().backward()
        optimizer.second_step(zero_grad=True)
    else:
        loss.backward()
        optimizer.step()
    unwrap(model).end_step()
    return loss.detach()


# ----------------------------------------------------------------------------- state helpers


def rng_state() -> dict:
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
    """Append JSON lines to ``path``, flushed as written (the sweep driver tails it); no-op off rank 0."""

    def __init__(self, path: Path, enabled: bool):
        self.fh = open(path, "a", buffering=1) if enabled else None

    def write(self, **fields) -> None:
        if self.fh is not None:
            fields.setdefault("time", time.time())
            self.fh.write(json.dumps(fields, allow_nan=True) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """The state of one running job (see :func:`train`)."""

    def __init__(self, cfg: Config, run_dir: Path, step_hook: Callable[[dict], None] | None = None,
                 gate: _BoundaryGate | None = None):
        self.cfg = cfg
        self.gate = gate or _BoundaryGate()
        self.run_dir = run_dir
        self.step_hook = step_hook
        self.ckpt_path = run_dir / "checkpoints" / "last.pt"

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is available")
        self.rank, self.world, self.local_rank, self.owns_group = setup_distributed("cuda" if want_cuda else "cpu")
        self.device = torch.device("cuda", self.local_rank) if want_cuda else torch.device("cpu")
        self.is_main = self.rank == 0
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size must be divisible by the world size {self.world}, got {cfg.train.batch_size}")
        self.local_batch = cfg.train.batch_size // self.world
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"

        from ltssl.data import prepare_dataset
        from ltssl.data.ffcv import EvalLoader, SSLLoader

        self._EvalLoader = EvalLoader
        # rank 0 prepares (idempotent, atomic); the others wait, then find it cached
        if self.is_main:
            self.data = prepare_dataset(cfg.data)
        self.barrier()
        if not self.is_main:
            self.data = prepare_dataset(cfg.data)
        self.boundary()  # a signal during preparation is handled now (no trainer state yet: nothing to save)
        recipe = "imagenet" if cfg.data.dataset == "imagefolder" else "cifar"
        self.loader = cached_loader(SSLLoader, self.data.train_beton, batch_size=self.local_batch, num_views=cfg.data.num_views,
                                image_size=self.data.image_size, recipe=recipe, seed=cfg.train.seed,
                                distributed=self.world > 1, device=self.device, num_workers=cfg.data.num_workers)
        self.steps_per_epoch = len(self.loader)
        self._eval_loaders: dict[str, object] = {}

        seed_everything(cfg.train.seed)
        method = method_class(cfg)(cfg, _build_encoder(cfg, self.data.image_size), self.data.num_classes)
        if self.device.type == "cuda" and self.world > 1 and cfg.model.sync_bn and cfg.model.norm == "batch":
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        method = method.to(self.device)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.method = method
        model: nn.Module = method
        if self.world > 1:
            # buffers (BN statistics, MoCo's queue) are not broadcast every forward: the queue is the same on
            # every rank by construction, and BN statistics are synchronised before each evaluation.
            model = nn.parallel.DistributedDataParallel(method, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                                                        **_no_forward_buffer_sync())
        if cfg.train.compile:
            model = torch.compile(model)
        self.model = model
        self.optimizer = build_optimizer(cfg.optim, method)
        scheme = cfg.optim.weighting if cfg.optim.name == "rwsam" else "none"
        self.weights = SampleWeights(scheme, self.data.class_counts, self.data.n_train, self.device, cfg.optim.label_power_base)

        self.epoch = 0            # current epoch, 0-based
        self.step_in_epoch = 0    # steps done in the current epoch
        self.global_step = 0
        self.train_time = 0.0     # seconds of training over all attempts
        self.last_loss = float("nan")
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        if self.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main)
        self.resumed = self.ckpt_path.exists()
        if self.resumed:
            self.load_checkpoint()
            self.log.write(epoch=self.epoch + (1 if self.step_in_epoch else 0), step=self.global_step, resumed=True,
                           step_in_epoch=self.step_in_epoch)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch},
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "train_time_s": self.train_time + (time.time() - self._attempt_start if self._attempt_start else 0.0),
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "last_loss": self.last_loss,
            "weights": self.weights.state_dict(),
            "rng": rng_state(),
            "world_size": self.world,
            "config": to_dict(self.cfg),
        }

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        atomic_torch_save(self.ckpt_path, self.state())

    def load_checkpoint(self) -> None:
        # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the model's device
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if state["schedule"]["steps_per_epoch"] != self.steps_per_epoch:
            raise RuntimeError(
                f"{self.ckpt_path}: {state['schedule']['steps_per_epoch']} steps per epoch, this job has {self.steps_per_epoch} "
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

    # ---------------------------------------------------------------- signals
    def boundary(self) -> None:
        """A consistent point: let pending SIGUSR2/SIGTERM handlers run (they may call checkpoint_now)."""
        self.gate.open()

    def _between_batches(self, batches):
        for batch in batches:
            yield batch
            self.boundary()

    # ---------------------------------------------------------------- features and evaluation
    def eval_loader(self, key: str, beton) -> object:
        if key not in self._eval_loaders:  # built once: every new FFCV loader pays numba compilation
            self._eval_loaders[key] = cached_loader(self._EvalLoader, beton, batch_size=EVAL_BATCH_SIZE[self.device.type], device=self.device,
                                                       num_workers=self.cfg.data.num_workers, distributed=self.world > 1)
        return self._eval_loaders[key]

    def sync_buffers(self) -> None:
        """Rank 0's buffers everywhere (BN statistics differ across ranks without SyncBatchNorm)."""
        if self.world > 1:
            for buf in self.method.buffers():
                dist.broadcast(buf, 0)

    def features(self, key: str, beton) -> tuple[torch.Tensor, torch.Tensor]:
        loader = self.eval_loader(key, beton)
        return extract_features(self.method.encoder, self._between_batches(loader), self.device, amp=self.amp,
                                channels_last=self.channels_last)

    def refresh_train_features(self) -> None:
        """KDE weights and/or the method's feature hook, at the start of an epoch when due."""
        cfg = self.cfg
        kde_due = self.weights.scheme == "kde" and self.epoch % cfg.optim.kde_every == 0 and self.weights.kde_epoch != self.epoch
        method_due = self.method.wants_train_features(self.epoch)
        if not (kde_due or method_due):
            return
        start = time.time()
        self.sync_buffers()
        feats, labels = self.features("train", self.data.train_beton)
        feature_time = time.time() - start
        if kde_due:
            self.weights.set_kde(kde_weights(feats, cfg.optim.kde_bandwidth, cfg.optim.kde_alpha), self.epoch)
        if method_due:
            self.method.on_train_features(feats, labels, self.epoch)
        stats = self.weights.stats()
        self.log.write(epoch=self.epoch + 1, step=self.global_step, kde_refresh=kde_due, train_features_s=feature_time,
                       refresh_s=time.time() - start, dataset_weight_mean=stats["weight_mean"], dataset_weight_max=stats["weight_max"])

    def knn_eval(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        self.sync_buffers()
        bank, bank_labels = self.features("probe", self.data.probe_beton)
        test, test_labels = self.features("test", self.data.test_beton)
        preds = knn_predict(bank, bank_labels, test, self.data.num_classes, k=self.cfg.eval.knn_k,
                            temperature=self.cfg.eval.knn_temperature)
        self._cached = (bank, bank_labels, test, test_labels)
        return accuracy(preds, test_labels), preds, test_labels

    def final_eval(self) -> dict:
        cfg = self.cfg
        knn_acc, knn_preds, test_labels = self.knn_eval()
        bank, bank_labels, test, _ = self._cached
        out = {"knn_acc": knn_acc}
        if cfg.eval.linear_epochs > 0:
            out.update(linear_report((bank, bank_labels), (test, test_labels), self.data.num_classes, cfg.eval,
                                     self.data.groups, seed=cfg.train.seed))
        else:  # no probe: the class-level figures come from the kNN predictions
            out.update(linear_acc=None, per_class_acc=per_class_accuracy(knn_preds, test_labels, self.data.num_classes))
            out.update(group_accuracy(knn_preds, test_labels, self.data.groups))
        for name in ("many", "medium", "few"):
            out.setdefault(f"acc_{name}", None)
        out["ood_linear_acc"] = None
        ood = getattr(self.data, "ood", None)
        if ood is not None and cfg.eval.linear_epochs > 0:
            ood_train = self.features("ood_probe", ood.probe_beton)
            ood_test = self.features("ood_test", ood.test_beton)
            out["ood_linear_acc"] = linear_report(ood_train, ood_test, ood.num_classes, cfg.eval, None, seed=cfg.train.seed)["linear_acc"]
        self.boundary()
        return out

    # ---------------------------------------------------------------- the loop
    def check_losses(self, pending: list[tuple[int, int, torch.Tensor]], values: torch.Tensor | None = None) -> None:
        """Raise NonFiniteLossError at the first non-finite loss of ``pending`` (or of ``values``, its global means)."""
        if not pending:
            return
        values = (torch.stack([loss for _, _, loss in pending]) if values is None else values).cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            epoch, step, _ = pending[i]
            raise NonFiniteLossError(f"loss is {values[i].item()} at epoch {epoch + 1} step {step + 1}")
        pending.clear()

    def run(self) -> dict:
        cfg = self.cfg
        self._attempt_start = None
        result_path = self.run_dir / "result.json"
        if self.epoch >= cfg.train.epochs and result_path.exists():  # a finished job started again
            return json.loads(result_path.read_text())
        self._attempt_start = time.time()
        sam = isinstance(self.optimizer, SAM)
        pending: list[tuple[int, int, torch.Tensor]] = []
        window_start, window_images = time.time(), 0
        # ascent weights of the samples drawn in the log window: sum, count, max (1 without re-weighting)
        wstats = torch.tensor([0.0, 0.0, 0.0], device=self.device)
        while self.epoch < cfg.train.epochs:
            self.refresh_train_features()
            self.boundary()
            for batch in self.loader.epoch(self.epoch, self.step_in_epoch):
                lr = learning_rate(cfg.optim, self.global_step, self.steps_per_epoch, cfg.train.epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if self.channels_last:
                    batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
                weights = self.weights.batch_weights(batch) if sam else None
                loss = train_step(self.model, self.optimizer, batch, weights, autocast=self.autocast)
                if weights is None:
                    wstats += torch.tensor([float(batch["index"].shape[0]), float(batch["index"].shape[0]), 0.0], device=self.device)
                    wstats[2] = torch.clamp(wstats[2], min=1.0)
                else:
                    w = weights.detach().float()
                    wstats[0] += w.sum()
                    wstats[1] += w.numel()
                    wstats[2] = torch.maximum(wstats[2], w.max())
                pending.append((self.epoch, self.step_in_epoch, loss))
                self.step_in_epoch += 1
                self.global_step += 1
                window_images += cfg.train.batch_size
                if self.global_step % cfg.train.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    losses = torch.stack([p[2] for p in pending]).float()
                    if self.world > 1:  # the global batch's loss; a NaN on any rank stops every rank here
                        dist.all_reduce(losses)
                        losses /= self.world
                        dist.all_reduce(wstats[:2])
                        dist.all_reduce(wstats[2:], op=dist.ReduceOp.MAX)
                    self.check_losses(pending, losses)
                    weight_mean, weight_max = float(wstats[0] / wstats[1]), float(wstats[2])
                    wstats.zero_()
                    self.last_loss = float(losses[-1])
                    self.epoch_loss_sum += float(losses.sum())
                    self.epoch_loss_count += len(losses)
                    now = time.time()
                    self.log.write(epoch=self.epoch + 1, step=self.global_step, loss=float(losses.mean()), lr=lr,
                                   images_per_s=window_images / max(now - window_start, 1e-9), weight_mean=weight_mean,
                                   weight_max=weight_max)
                    window_start, window_images = now, 0
                self.boundary()
                if self.step_hook is not None:
                    self.step_hook({"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step})
            self.check_losses(pending)
            epoch_loss = self.epoch_loss_sum / max(1, self.epoch_loss_count)
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
            if cfg.train.eval_every and self.epoch % cfg.train.eval_every == 0 and self.epoch < cfg.train.epochs:
                knn_acc, _, _ = self.knn_eval()
                self.log.write(epoch=self.epoch, step=self.global_step, knn_acc=knn_acc, epoch_loss=epoch_loss)
            if self.epoch % cfg.train.checkpoint_every == 0 or self.epoch == cfg.train.epochs:
                self.save_checkpoint()
            self.boundary()
            window_start, window_images = time.time(), 0
        train_time = self.train_time + (time.time() - self._attempt_start)
        result = self.final_eval()
        result.update(epochs_run=self.epoch, train_time_s=train_time, n_train=self.data.n_train, num_classes=self.data.num_classes,
                      class_counts=list(self.data.class_counts), world_size=self.world, final_loss=self.last_loss)
        if self.is_main:
            self.log.write(epoch=self.epoch, step=self.global_step, final=True, **result)
            atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
        return result

    def close(self) -> None:
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        if getattr(self, "owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()


def _no_forward_buffer_sync() -> dict:
    """DDP's keyword for "do not broadcast buffers at every forward" (renamed after torch 2.11)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _build_encoder(cfg: Config, image_size: int) -> nn.Module:
    from ltssl.models import build_backbone

    return build_backbone(cfg.model, image_size)


class _BoundaryGate:
    """Hold SIGUSR2/SIGTERM handlers until a step boundary.

    While installed, each signal's Python handler is replaced by one that calls the original
    at once if the trainer is at a boundary, and otherwise queues the signal; :meth:`open`
    (called at every boundary) delivers the queue. Without it, a signal delivered to a thread
    that does not block it runs the handler in the main thread between two bytecodes of a
    step, e.g. after SAM's ascent step, and the checkpoint would hold the perturbed weights.
    """

    def __init__(self):
        self.originals: dict[int, Callable] = {}
        self.pending: list[int] = []
        self.at_boundary = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there; the sigmask still applies
        for sig in CHECKPOINT_SIGNALS:
            original = signal.getsignal(sig)
            if callable(original):
                self.originals[sig] = original
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:
        if self.at_boundary:
            self.originals[signum](signum, frame)
        elif signum not in self.pending:
            self.pending.append(signum)

    def open(self) -> None:
        """A consistent point: run held handlers and any signal pending on the thread's mask."""
        self.at_boundary = True
        try:
            while self.pending:
                signum = self.pending.pop(0)
                self.originals[signum](signum, None)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CHECKPOINT_SIGNALS)  # CPython runs pending handlers here
            signal.pthread_sigmask(signal.SIG_BLOCK, CHECKPOINT_SIGNALS)
        finally:
            self.at_boundary = False

    def uninstall(self) -> None:
        """Restore the handlers; a signal still held is raised again for them (the caller's mask decides when)."""
        for sig, original in self.originals.items():
            signal.signal(sig, original)
        held, self.pending, self.originals = self.pending, [], {}
        for signum in held:
            signal.raise_signal(signum)


def train(cfg: Config, run_dir, *, step_hook: Callable[[dict], None] | None = None) -> dict:
    """Pre-train, evaluate and return the result dict (keys in CONTRACTS.md); resumes from ``run_dir/checkpoints/last.pt``.

    ``step_hook(info)``, if given, is called after every step at the step boundary with
    ``{"epoch": 0-based, "step_in_epoch": steps done, "global_step"}`` (tests interrupt runs with it).
    Raises :class:`NonFiniteLossError` on a NaN/inf loss, ``ConfigError``/``UnknownNameError`` on bad names.
    """
    global _ACTIVE
    check_backbone(cfg.model.backbone)  # check_names minus the batch/world check: the real world size comes later
    method_class(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHECKPOINT_SIGNALS)
    gate = _BoundaryGate()
    gate.install()
    trainer = Trainer(cfg, run_dir, step_hook, gate)
    trainer._attempt_start = None
    try:
        trainer.setup()
        _ACTIVE = trainer
        return trainer.run()
    except BaseException:
        # an epoch left unfinished may still have an FFCV thread writing into its loader's buffers
        # (EpochIterator.close() does not join it): never hand such a loader to a later job
        _LOADERS.clear()
        raise
    finally:
        _ACTIVE = None
        trainer.close()
        gate.uninstall()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
