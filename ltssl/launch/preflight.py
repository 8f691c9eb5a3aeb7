"""Checks before anything is submitted: a refused job costs nothing and says why in one line."""

from __future__ import annotations

import os
from pathlib import Path

from ltssl.config import Config, ConfigError, validate
from ltssl.data import dataset_dir_name
from ltssl.data.errors import DataError
from ltssl.data.prepare import check_data_config
from ltssl.data.sources import missing_source
from ltssl import tracking
from ltssl.launch import slurm
from ltssl.launch.errors import LaunchError


def tasks_per_node(cfg: Config) -> int:
    """One task per GPU when the job asks for GPUs, else ``launch.tasks_per_node`` (CPU DDP)."""
    return cfg.launch.gpus_per_node if cfg.launch.gpus_per_node > 0 else cfg.launch.tasks_per_node


def preflight(cfg: Config, *, check_names: bool = True) -> None:
    """Raise a one-line :class:`LaunchError` unless the job can run as configured.

    Checks, in order: the configuration is valid and its trackers can work
    (``ltssl.tracking.check``); the training module accepts the names in it
    (``ltssl.train.check_names(cfg)``; skipped with ``check_names=False``, for jobs that run
    another target); the dataset is readable; then, with
    ``launch.partition`` set, that the partition exists (``sinfo``) and that one task layout
    (GPUs, CPUs, memory per node; node count; constraint; time limit) fits its nodes, or without
    a partition, that the local machine can host it (one node, enough GPUs and memory).
    """
    try:
        validate(cfg)
        tracking.check(cfg)  # a missing tracker package or W&B online without login: refused before submitting
    except ConfigError as error:
        raise LaunchError(str(error)) from None
    if cfg.launch.signal_delay_s >= cfg.launch.timeout_min * 60:
        raise LaunchError(
            f"launch.signal_delay_s must be < launch.timeout_min * 60 = {cfg.launch.timeout_min * 60}, got {cfg.launch.signal_delay_s}"
        )
    if check_names:
        _check_names(cfg)
    check_dataset(cfg)
    if cfg.launch.partition is None:
        _check_local(cfg)
    else:
        _check_partition(cfg)


def _check_names(cfg: Config) -> None:
    # Deferred: ltssl.train imports torch (seconds); sweeps skip this check (check_names=False).
    import ltssl.train as train_module  # noqa: PLC0415

    try:
        train_module.check_names(cfg)
    except (ConfigError, ValueError, KeyError) as error:
        raise LaunchError(str(error).strip().splitlines()[0] if str(error).strip() else repr(error)) from None


def _readable(path: Path, key: str, want_dir: bool | None = None) -> None:
    if not path.exists():
        raise LaunchError(f"{key} {path} does not exist")
    if want_dir is True and not path.is_dir():
        raise LaunchError(f"{key} {path} is not a folder")
    if want_dir is False and not path.is_file():
        raise LaunchError(f"{key} {path} is not a file")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise LaunchError(f"{key} {path} is not readable")


def _source(dataset: str, root: str, key: str) -> None:
    """A source folder: missing -> the one-line error that also says how to get it."""
    if not Path(root).exists():
        raise LaunchError(str(missing_source(dataset, root, key)))
    _readable(Path(root), key, want_dir=True)


def _prepared_dir(cfg: Config) -> Path | None:
    """Where ltssl.data caches this dataset (``cache_dir/<dataset_dir_name>``), or None."""
    try:
        return Path(cfg.data.cache_dir) / dataset_dir_name(cfg.data)
    except Exception:  # a data-side error: the source checks below say what is wrong
        return None


def check_dataset(cfg: Config) -> None:
    """The prepared dataset (a folder with manifest.json) exists, or its source is readable.

    Relative paths are read from the current directory, as the job will (it runs there).
    """
    data = cfg.data
    prepared = _prepared_dir(cfg)
    if prepared is not None and (prepared / "manifest.json").is_file():
        _readable(prepared / "manifest.json", "data.cache_dir: prepared manifest")
        return
    if data.root:
        _source(data.dataset, data.root, "data.root")
    elif data.dataset != "digits":
        raise LaunchError(f"data.root must name the {data.dataset} source folder, got None")
    if data.split_file:
        _readable(Path(data.split_file), "data.split_file", want_dir=False)
    if data.ood_dataset and data.ood_dataset not in ("digits", "digits_ood"):  # embedded: no source folder
        if not data.ood_root:
            raise LaunchError(f"data.ood_root must name the {data.ood_dataset} source folder, got None")
        _source(data.ood_dataset, data.ood_root, "data.ood_root")
    try:  # e.g. a configured imbalance ratio that contradicts the split file: refused before submitting
        check_data_config(data)
    except DataError as error:
        raise LaunchError(str(error)) from None
    # The job writes the prepared dataset under cache_dir: it must be creatable and writable.
    cache = Path(data.cache_dir).absolute()
    existing = cache
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LaunchError(f"data.cache_dir {cache}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LaunchError(f"data.cache_dir {cache} is not writable")


def _local_gpus() -> int:
    return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[len("nvidia") :].isdigit()]) if os.path.isdir("/dev") else 0


def _check_local(cfg: Config) -> None:
    launch = cfg.launch
    if launch.nodes != 1:
        raise LaunchError(f"launch.nodes must be 1 without launch.partition (the local executor runs on this machine), got {launch.nodes}")
    if launch.gpus_per_node > 0:
        have = _local_gpus()
        if launch.gpus_per_node > have:
            raise LaunchError(f"launch.gpus_per_node={launch.gpus_per_node} but this machine has {have} GPUs (set launch.partition to use Slurm)")
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    if launch.mem_gb * 1024 > total_mb:
        raise LaunchError(f"launch.mem_gb={launch.mem_gb:g} but this machine has {total_mb / 1024:.1f} GB of memory")


def _check_partition(cfg: Config) -> None:
    launch = cfg.launch
    name = launch.partition
    nodes = slurm.partition_nodes(name)
    if not nodes:
        known = slurm.partitions()
        raise LaunchError(f"launch.partition {name!r} does not exist (partitions: {', '.join(known) or 'none'})")
    ntasks = tasks_per_node(cfg)
    cpus = ntasks * launch.cpus_per_task
    mem_mb = launch.mem_gb * 1024
    usable = [n for n in nodes if "DOWN" not in n.state and "DRAIN" not in n.state and n.state not in ("FAIL", "INVAL")] or nodes
    if launch.constraint:
        # A plain feature name or features joined by '&'; richer expressions are left to Slurm.
        wanted = {f.strip() for f in launch.constraint.split("&") if f.strip()}
        if all(f.replace("_", "").replace("-", "").isalnum() for f in wanted):
            usable = [n for n in usable if wanted <= n.features]
            if not usable:
                raise LaunchError(f"launch.constraint {launch.constraint!r}: no node of partition {name} has these features")
    best_cpus = max(n.cpus for n in usable)
    if cpus > best_cpus:
        raise LaunchError(
            f"launch: {ntasks} tasks x {launch.cpus_per_task} CPUs = {cpus} CPUs per node, but nodes of partition {name} have at most {best_cpus}"
        )
    best_gpus = max(n.gpus for n in usable)
    if launch.gpus_per_node > best_gpus:
        raise LaunchError(f"launch.gpus_per_node={launch.gpus_per_node}, but nodes of partition {name} have at most {best_gpus} GPUs")
    best_mem = max(n.memory_mb for n in usable)
    if mem_mb > best_mem:
        raise LaunchError(f"launch.mem_gb={launch.mem_gb:g}, but nodes of partition {name} have at most {best_mem / 1024:.1f} GB")
    fitting = [n for n in usable if n.cpus >= cpus and n.gpus >= launch.gpus_per_node and n.memory_mb >= mem_mb]
    if len(fitting) < launch.nodes:
        raise LaunchError(f"launch.nodes={launch.nodes}, but only {len(fitting)} node(s) of partition {name} fit {cpus} CPUs, {launch.gpus_per_node} GPUs, {launch.mem_gb:g} GB")
    limit = nodes[0].time_limit_min
    if limit is not None and launch.timeout_min > limit:
        raise LaunchError(f"launch.timeout_min={launch.timeout_min}, but partition {name} allows at most {limit} minutes")
