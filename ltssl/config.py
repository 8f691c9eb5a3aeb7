"""Typed configuration: the one source of defaults for a training run.

A run's configuration is a :class:`Config` made of eight sections, which are
also the top-level keys of a YAML file: ``data``, ``model``, ``method``,
``optim``, ``train``, ``eval``, ``launch``, ``tracking``. A YAML file may give any subset of
sections and of keys within them; everything else keeps the defaults below.

Every field carries its constraint in ``metadata`` (``choices``, ``ge``, ``gt``,
``le``), so validation and the error messages come from one place::

    >>> load_config({"optim": {"rho": -1}})
    ConfigError: optim.rho must be >= 0, got -1

Every run writes its fully resolved configuration next to its outputs with
:func:`save_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ltssl.io import atomic_write_text


class ConfigError(ValueError):
    """A configuration value is wrong. The message is one line naming the dotted key."""


def _f(default: Any, help: str = "", **constraints: Any) -> Any:
    """A dataclass field with its help text and constraints in metadata."""
    meta = {"help": help, **constraints}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- sections


#: DataConfig fields that are file system paths: made absolute before a job runs in another folder or node.
DATA_PATH_KEYS = ("root", "split_file", "test_split_file", "ood_root", "cache_dir")


@dataclass
class DataConfig:
    dataset: str = _f("digits", "source dataset", choices=["digits", "cifar10", "cifar100", "imagefolder"])
    root: str | None = _f(None, "source folder (CIFAR 'python version' folder, or image-folder root); unused for digits")
    split_file: str | None = _f(None, "published LT split list ('relative/path label' per line); replaces re-sampling")
    imbalance_ratio: float = _f(10.0, "n_max / n_min of the exponential long-tail profile; 1 = balanced", ge=1)
    n_max: int | None = _f(None, "images kept for the most frequent class; None = the most the source allows", ge=1)
    balanced: bool = _f(False, "use the balanced subset with the same total n as the LT subset (for Delta(n, r))")
    class_order: list[int] | None = _f(None, "classes from frequent to rare; None = by class index")
    semi_synthetic: bool = _f(False, "the paper's semi-synthetic layout: frequent images carry a rare-class half")
    image_size: int = _f(32, "side of the (square) training image in pixels", ge=8)
    num_views: int = _f(2, "augmented views per image (K > 2 for multi-view SSL)", ge=1)
    seed: int = _f(0, "seed of the subset sampling (which images are kept)", ge=0)
    num_workers: int = _f(2, "loader threads per process", ge=1)
    cache_dir: str = _f("data", "where prepared LT datasets (.beton files + manifest) are written and reused")
    ood_dataset: str | None = _f(None, "dataset for out-of-domain linear probing, e.g. cifar100 for a cifar10 pretrain, "
                                 "digits_ood (digits inverted and rotated) for digits",
                                 choices=["digits", "digits_ood", "cifar10", "cifar100", "imagefolder"])
    ood_root: str | None = _f(None, "source folder of the out-of-domain dataset")
    test_split_file: str | None = _f(None, "imagefolder: published test list ('relative/path label'); None = root/val or root/test")
    probe_per_class: int | None = _f(None, "images per class of the balanced linear-probe subset; None = the most the smallest class allows", ge=1)
    resident: str = _f("auto", "training set decoded once and kept on the training device (no loader threads); "
                       "auto = on for a CUDA device when it fits data.resident_max_mb", choices=["auto", "on", "off"])
    resident_max_mb: float = _f(4096.0, "data.resident auto: largest decoded training set (MiB) kept on the device", gt=0)
    resident_compile: str = _f("auto", "the resident set's augmentation through torch.compile (inductor): auto = on a CUDA "
                               "device, eager (with a warning) if compiling fails; on = compile or fail; off = never (a CPU keeps its numba kernel)",
                               choices=["auto", "on", "off"])


@dataclass
class ModelConfig:
    backbone: str = _f("small_cnn", "encoder: small_cnn (digits), resnet18_cifar, resnet50")
    norm: str = _f("batch", "normalisation layers in the backbone", choices=["batch", "group"])
    sync_bn: bool = _f(True, "convert BatchNorm to SyncBatchNorm under multi-GPU DDP (never on CPU)")


@dataclass
class TaseConfig:
    """TASE (Xiao et al. 2024): pseudo-label driven per-sample temperature and weight."""

    enabled: bool = _f(False, "use TASE's per-sample temperatures and weights in the contrastive loss")
    num_clusters: int = _f(10, "k of k-means on the L2-normalised features", ge=2)
    refresh_every: int = _f(1, "re-cluster every this many epochs", ge=1)
    tau_min: float = _f(0.1, "temperature of the smallest (tail-like) clusters", gt=0)
    tau_max: float = _f(0.5, "temperature of the largest (head-like) clusters", gt=0)
    weight_power: float = _f(0.5, "weight of a sample ~ cluster_size ** -weight_power (normalised to mean 1)", ge=0)
    temperature_power: float = _f(0.5, "tau_c = tau_min + (tau_max - tau_min) * (n_c / n_max) ** temperature_power", ge=0)
    kmeans_iters: int = _f(30, "Lloyd iterations of the spherical k-means", ge=1)
    start_epoch: int = _f(0, "first epoch (0-based) whose loss uses TASE; before it: global temperature, weight 1", ge=0)


@dataclass
class MultiViewConfig:
    """More than two views per image (Sharma and Padmanabhan 2025)."""

    pairing: str = _f("all_pairs", "which view pairs the loss averages", choices=["all_pairs", "anchor"])
    filter_quantile: float = _f(0.0, "mask feature dims whose cross-view spread is beyond this upper quantile; 0 = off", ge=0, le=1)
    filter_statistic: str = _f("spread", "extremeness of a dim across the views: spread (max - min over views) or zscore (max |z - mean| / std)", choices=["spread", "zscore"])


@dataclass
class MethodConfig:
    name: str = _f("simsiam", "SSL method (registered name): simsiam, simclr, moco_v2, supervised")
    proj_dim: int = _f(2048, "projector output dimension", ge=1)
    proj_hidden_dim: int = _f(2048, "projector hidden dimension", ge=1)
    pred_hidden_dim: int = _f(512, "SimSiam predictor bottleneck dimension", ge=1)
    temperature: float = _f(0.2, "softmax temperature of NT-Xent / InfoNCE", gt=0)
    moco_queue_size: int = _f(4096, "MoCo v2 negative queue length", ge=1)
    moco_momentum: float = _f(0.99, "MoCo v2 momentum of the key encoder", ge=0, le=1)
    tase: TaseConfig = _f(TaseConfig())
    multiview: MultiViewConfig = _f(MultiViewConfig())


@dataclass
class OptimConfig:
    name: str = _f("rwsam", "optimizer", choices=["sgd", "sam", "rwsam"])
    lr: float = _f(0.06, "base learning rate (for the global batch)", gt=0)
    momentum: float = _f(0.9, "SGD momentum", ge=0, le=1)
    weight_decay: float = _f(5e-4, "SGD weight decay", ge=0)
    schedule: str = _f("cosine", "learning-rate schedule", choices=["cosine", "constant"])
    warmup_epochs: int = _f(0, "linear warm-up epochs", ge=0)
    rho: float = _f(0.5, "SAM/rwSAM perturbation radius", ge=0)
    adaptive: bool = _f(True, "ASAM scaling T(w) = |w| (the authors' rwSAM always used it)")
    weighting: str = _f("kde", "rwSAM ascent weights", choices=["none", "label_power", "kde"])
    label_power_base: float = _f(1.2, "label_power: w = base ** class_rank (rank 0 = most frequent)", gt=0)
    kde_alpha: float = _f(1.0, "kde: w ~ density ** -alpha (0 = plain SAM)", ge=0)
    kde_bandwidth: float = _f(0.5, "kde: Gaussian kernel bandwidth h on L2-normalised features", gt=0)
    kde_every: int = _f(1, "kde: recompute features and weights every this many epochs", ge=1)


@dataclass
class TrainConfig:
    epochs: int = _f(10, "training epochs", ge=1)
    batch_size: int = _f(128, "global batch size (split across ranks)", ge=1)
    seed: int = _f(0, "seed of initialisation, augmentation and data order", ge=0)
    device: str = _f("auto", "auto = cuda when available, else cpu", choices=["auto", "cpu", "cuda"])
    amp: bool | None = _f(None, "bf16 autocast of the forward passes; None = on with CUDA, off on the CPU; true applies on the CPU too")
    channels_last: bool | None = _f(None, "channels_last memory format; None = on with CUDA, off on the CPU; true applies on the CPU too")
    compile: bool = _f(False, "torch.compile the model")
    checkpoint_every: int = _f(1, "save a checkpoint every this many epochs", ge=1)
    log_every: int = _f(10, "write a step metrics line every this many steps", ge=1)
    eval_every: int = _f(1, "kNN monitor every this many epochs (0 = only at the end)", ge=0)
    restart_on_corrupt_checkpoint: bool = _f(False, "when no saved checkpoint of the run is readable (last.pt and previous.pt "
                                             "both corrupt), start the run over instead of stopping with an error")


@dataclass
class EvalConfig:
    knn_k: int = _f(20, "neighbours of the kNN classifier (cosine similarity)", ge=1)
    knn_temperature: float = _f(0.1, "temperature of the kNN vote weights", gt=0)
    linear_epochs: int = _f(50, "linear-probe epochs on frozen, cached features", ge=0)
    linear_lr: float = _f(0.1, "linear-probe learning rate", gt=0)
    linear_batch_size: int = _f(256, "linear-probe batch size", ge=1)


@dataclass
class LaunchConfig:
    partition: str | None = _f(None, "Slurm partition; None = run locally through submitit's local executor")
    nodes: int = _f(1, "nodes per job", ge=1)
    gpus_per_node: int = _f(0, "GPUs per node (one task per GPU when > 0)", ge=0)
    tasks_per_node: int = _f(1, "processes per node when gpus_per_node is 0 (CPU DDP)", ge=1)
    cpus_per_task: int = _f(1, "CPUs per task", ge=1)
    mem_gb: float = _f(4.0, "memory per node in GB", gt=0)
    timeout_min: int = _f(60, "time limit of one job attempt in minutes", ge=1)
    signal_delay_s: int = _f(60, "seconds before the time limit at which Slurm signals the job to checkpoint", ge=0)
    max_num_timeout: int = _f(20, "requeues after preemption or time limit before giving up", ge=0)
    account: str | None = _f(None, "Slurm account")
    qos: str | None = _f(None, "Slurm QoS")
    constraint: str | None = _f(None, "Slurm node constraint")
    requeue_on_node_failure: bool = _f(True, "requeue the job when a node fails")
    controller_downtime_s: int = _f(
        600, "seconds slurmctld may stay unreachable before a job's handle gives up on it (the job itself keeps running)", ge=0
    )


@dataclass
class TrackingConfig:
    """Experiment trackers fed by the job (rank 0); metrics.jsonl and the results parquet stay the record."""

    tensorboard: bool = _f(True, "write TensorBoard event files into the run folder (tensorboard --logdir <sweep folder>)")
    wandb_project: str | None = _f(None, "Weights & Biases project: one W&B run per trial (id <sweep id>-<trial id>, group "
                                   "<sweep id>); None = off")
    wandb_entity: str | None = _f(None, "W&B entity (user or team); None = the account's default")
    wandb_mode: str | None = _f(None, "W&B mode; None = the WANDB_MODE environment variable, else online "
                                "(offline runs are synced later with wandb sync)", choices=["online", "offline"])
    mlflow: bool = _f(False, "log to MLflow: one run per trial nested under a parent run of the sweep")
    mlflow_uri: str | None = _f(None, "MLflow tracking URI; None = the file store file:<sweep folder>/mlruns "
                                "(file:<run folder>/mlruns outside a sweep)")
    mlflow_experiment: str = _f("ltssl", "MLflow experiment of the runs")


@dataclass
class Config:
    data: DataConfig = _f(DataConfig())
    model: ModelConfig = _f(ModelConfig())
    method: MethodConfig = _f(MethodConfig())
    optim: OptimConfig = _f(OptimConfig())
    train: TrainConfig = _f(TrainConfig())
    eval: EvalConfig = _f(EvalConfig())
    launch: LaunchConfig = _f(LaunchConfig())
    tracking: TrackingConfig = _f(TrackingConfig())


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _check_constraints(value: Any, meta: dict, key: str, given: Any = None) -> None:
    """Raise if ``value`` breaks a constraint; the message quotes ``given``, the value as written."""
    given = value if given is None else given
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, meta['choices']))}, got {given!r}")
    for op, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"), ("le", lambda a, b: a <= b, "<=")):
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(f"{key} must be {word} {meta[op]}, got {given!r}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    # typing.get_type_hints evaluates every annotation string: a sweep driver builds a config per trial
    return typing.get_type_hints(cls)


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from the defaults overridden by mapping ``values``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys, got {values!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown key {where} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, values.get(name), key)
            continue
        if name not in values:
            continue
        value = _coerce(values[name], tp, key)
        _check_constraints(value, f.metadata, key, given=values[name])
        kwargs[name] = value
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Re-check every field of an already built config (e.g. after ``dataclasses.replace``)."""
    _build(Config, to_dict(cfg), "")
    if cfg.data.dataset != "digits" and not cfg.data.root:
        raise ConfigError(f"data.root must name the {cfg.data.dataset} source folder, got None")
    if cfg.method.tase.tau_min > cfg.method.tase.tau_max:
        raise ConfigError(
            f"method.tase.tau_min must be <= method.tase.tau_max, got {cfg.method.tase.tau_min} > {cfg.method.tase.tau_max}"
        )
    return cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.rho=0.5"`` -> ``("optim.rho", 0.5)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(source: str | os.PathLike | dict | None = None, overrides: dict | list[str] | None = None) -> Config:
    """Defaults, then the YAML file (or mapping) ``source``, then ``overrides``.

    ``overrides`` is a mapping of dotted keys (``{"optim.rho": 0.5}``) or a list
    of ``"optim.rho=0.5"`` strings. Raises :class:`ConfigError` on the first bad key.
    """
    if source is None:
        tree: dict = {}
    elif isinstance(source, dict):
        tree = json.loads(json.dumps(source))  # a deep copy we may modify
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as fh:
            tree = yaml.safe_load(fh) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return validate(_build(Config, tree, ""))


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (YAML/JSON-ready) of a config or any of its sections."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved ltssl configuration: every field, defaults included.\n" + yaml.safe_dump(
        to_dict(cfg), sort_keys=False
    )
    atomic_write_text(path, text)
    return path


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field: the reference table of the README."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key)
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((key, default, f.metadata.get("help", "")))

    walk(Config, "")
    return rows
