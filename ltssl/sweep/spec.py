"""Sweep definitions: parse and validate ``sweeps/<dataset>/<name>.yaml``, and plan its trials.

A sweep file names a base training configuration, the axes to vary, and the budget::

    name: digits_lt-default         # optional; default <folder>-<file stem>
    base: train.yaml                # training config, relative to this file, or inline sections
    overrides: {train.epochs: 3}    # dotted keys applied to the base for every trial
    grid:                           # every combination runs
      data.imbalance_ratio: [1, 10]
      variants:                     # one grid axis whose values set several keys together
        - {optim.name: sgd}
        - {optim.name: rwsam, optim.weighting: kde}
    sample:                         # drawn num_samples times
      optim.rho: {loguniform: [0.05, 5]}
      optim.kde_alpha: {uniform: [0, 2]}
      optim.label_power_base: {choice: [1.1, 1.2]}
    num_samples: 4
    metric: knn_acc                 # what is optimised, and which way
    mode: max
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or none
    search: {algorithm: random, seed: 0}                            # or tpe
    max_concurrent: 4
    max_trials: 200                 # refuse a sweep with more trials than this
    launch: {nodes: 1, gpus_per_node: 1, cpus_per_task: 8}          # per-trial Slurm resources

Keys of ``grid`` and ``sample`` are dotted config keys (``optim.rho``); the short aliases in
:data:`ALIASES` (``rho``, ``imbalance_ratio``, ``method``, ``seed`` ...) are accepted too.

Trials: with ``search.algorithm: random`` the sampled points are drawn up front from
``search.seed`` and the i-th point runs in every grid cell, so ratios and seeds are compared at
the same hyperparameters (mean +- std over seeds is then meaningful). With ``tpe`` each group of
cells that differ only by seed gets its own Optuna TPE study, asked one trial at a time.

Every check happens here, before Ray starts or anything is submitted; errors are one line naming
the key (:class:`SweepError`).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ltssl.config import DATA_PATH_KEYS, SECTIONS, Config, ConfigError, load_config, to_dict


class SweepError(ValueError):
    """A sweep definition is wrong. The message is one line naming the key."""


#: Short names accepted in ``grid``/``sample`` for the dotted config keys they stand for.
ALIASES = {
    "dataset": "data.dataset",
    "imbalance_ratio": "data.imbalance_ratio",
    "balanced": "data.balanced",
    "n_max": "data.n_max",
    "data_seed": "data.seed",
    "method": "method.name",
    "backbone": "model.backbone",
    "optimizer": "optim.name",
    "lr": "optim.lr",
    "rho": "optim.rho",
    "adaptive": "optim.adaptive",
    "weighting": "optim.weighting",
    "label_power_base": "optim.label_power_base",
    "kde_alpha": "optim.kde_alpha",
    "kde_bandwidth": "optim.kde_bandwidth",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
}

TOP_LEVEL_KEYS = (
    "name", "description", "base", "overrides", "grid", "sample", "num_samples", "metric", "mode",
    "scheduler", "search", "max_concurrent", "max_trials", "launch", "poll_interval_s",
)
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor", "max_t", "group_by")
SEARCH_KEYS = ("algorithm", "seed", "n_startup_trials")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")

#: Metric name -> (default mode, reported every evaluation epoch?). knn_acc and loss arrive
#: during training (the scheduler can act on them); the others only in the final line.
METRICS = {
    "knn_acc": ("max", True),
    "loss": ("min", True),
    "linear_acc": ("max", False),
    "acc_many": ("max", False),
    "acc_medium": ("max", False),
    "acc_few": ("max", False),
    "ood_linear_acc": ("max", False),
    "final_loss": ("min", False),
}

#: The scheduler compares a trial only with trials in the same group: accuracy at imbalance
#: ratio 100 is not ranked against accuracy at ratio 1, nor SSL against supervised.
DEFAULT_GROUP_BY = ("data.dataset", "data.imbalance_ratio", "data.balanced", "method.name")

#: Grid axes whose values are repetitions rather than choices (TPE shares one study across them).
SEED_KEYS = ("train.seed", "data.seed")

DEFAULT_MAX_TRIALS = 200

_CONFIG_KEYS = None


def config_keys() -> set[str]:
    """Every dotted key of :class:`ltssl.config.Config` (leaves only)."""
    global _CONFIG_KEYS
    if _CONFIG_KEYS is None:
        keys = set()

        def walk(tree: dict, prefix: str) -> None:
            for k, v in tree.items():
                dotted = f"{prefix}.{k}" if prefix else k
                if isinstance(v, dict):
                    walk(v, dotted)
                else:
                    keys.add(dotted)

        walk(to_dict(Config()), "")
        _CONFIG_KEYS = keys
    return _CONFIG_KEYS


@dataclass(frozen=True)
class Distribution:
    """A sampled axis: ``kind`` in loguniform/uniform/randint (low, high) or choice (values)."""

    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    def extremes(self) -> list:
        """The values every trial config is validated with before the sweep starts."""
        if self.kind == "choice":
            return list(self.values)
        return [self.low, self.high]

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "loguniform":
            return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.kind == "uniform":
            return _round(rng.uniform(self.low, self.high))
        if self.kind == "randint":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        return _plain(self.values[int(rng.integers(len(self.values)))])

    def to_yaml(self) -> dict:
        if self.kind == "choice":
            return {"choice": list(self.values)}
        return {self.kind: [self.low, self.high]}


def _round(x: float) -> float:
    """Four significant digits: tables read rho=0.5123, and nothing is lost at this precision."""
    return float(f"{x:.4g}")


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "none"                 # none | asha
    grace_period: int = 1              # epochs before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int | None = None           # epochs; None = the most epochs of any trial
    group_by: tuple = DEFAULT_GROUP_BY


@dataclass(frozen=True)
class SearchSpec:
    algorithm: str = "random"          # random | tpe
    seed: int = 0
    n_startup_trials: int = 4          # TPE: random trials per study before TPE takes over


@dataclass
class TrialPlan:
    """One trial: its id, the sweep axes' values and the fully resolved training config."""

    trial_id: str
    params: dict          # dotted key -> value, the grid cell and sampled values of this trial
    config: dict          # to_dict(Config) of the resolved training config
    group: str            # scheduler group label, e.g. "digits/r=10/lt/simsiam"
    study: str            # TPE study label (the cell without its seed axes)


@dataclass
class SweepSpec:
    name: str
    base: dict                          # training config tree (sections), paths made absolute
    overrides: dict                     # dotted key -> value for every trial
    grid: dict                          # dotted key (or "variants") -> list of values
    sample: dict                        # dotted key -> Distribution
    num_samples: int = 1
    metric: str = "knn_acc"
    mode: str = "max"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    max_concurrent: int = 4
    max_trials: int = DEFAULT_MAX_TRIALS
    launch: dict = field(default_factory=dict)
    poll_interval_s: float = 0.5
    description: str = ""
    source: str | None = None           # the file it was read from

    # ------------------------------------------------------------------ trial planning

    def cells(self) -> list[dict]:
        """The grid's cells: each a dict of dotted key -> value (variants expanded)."""
        axes = []
        for key, values in self.grid.items():
            if key == "variants":
                axes.append([dict(v) for v in values])
            else:
                axes.append([{key: v} for v in values])
        cells = []
        for combo in itertools.product(*axes) if axes else [()]:
            cell: dict = {}
            for part in combo:
                cell.update(part)
            cells.append(cell)
        return cells

    def num_trials(self) -> int:
        """Grid cells x num_samples: an upper bound (identical trials are planned once)."""
        n = 1
        for key, values in self.grid.items():
            n *= len(values)
        return n * self.num_samples

    def trial_overrides(self, params: dict, partition: str | None) -> dict:
        """Dotted overrides of the base config for one trial (base < overrides < launch < params)."""
        out = dict(self.overrides)
        out.update({f"launch.{k}": v for k, v in self.launch.items()})
        out["launch.partition"] = partition
        out.update(params)
        return out

    def resolve(self, params: dict, partition: str | None, trial_id: str = "trial", label: str | None = None) -> Config:
        """The training config of one trial; a bad value is a one-line SweepError naming the key."""
        try:
            return load_config(self.base, self.trial_overrides(params, partition))
        except ConfigError as err:
            where = ", ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, dict))
            raise SweepError(f"{label or f'trial {trial_id}'} ({where}): {err}") from None

    def group_of(self, cfg: dict) -> str:
        parts = []
        for key in self.scheduler.group_by:
            value = _get_dotted(cfg, key)
            short = key.split(".")[-1]
            if key == "data.imbalance_ratio":
                parts.append(f"r={_fmt(value)}")
            elif key == "data.balanced":
                parts.append("balanced" if value else "lt")
            elif key in ("data.dataset", "method.name"):
                parts.append(str(value))
            else:
                parts.append(f"{short}={_fmt(value)}")
        return "/".join(parts)

    def study_of(self, cell: dict) -> str:
        kept = {k: v for k, v in _cell_params(cell).items() if k not in SEED_KEYS}
        return json.dumps(kept, sort_keys=True, default=str)

    def plan(self, partition: str | None) -> list[TrialPlan]:
        """Every trial of a random/grid sweep, in run order (sample-major, then grid cell).

        For TPE the sampled values are not known up front: the returned trials carry only the
        grid cell (``params`` without the sampled keys); the searcher fills them in.
        """
        trials = []
        for trial_id, params, cell in self.plan_params():
            cfg = self.resolve(params, partition, trial_id)
            tree = to_dict(cfg)
            trials.append(TrialPlan(trial_id, params, tree, self.group_of(tree), self.study_of(cell)))
        return trials

    def plan_params(self):
        """(trial id, params, grid cell) of every trial, in run order, without resolving configs.

        A variant may pin a sampled key (the SGD baseline's ``optim.rho: 0``): its value wins,
        and a trial identical to an earlier one is planned once.
        """
        rng = np.random.default_rng(self.search.seed)
        cells = self.cells()
        index = 0
        seen = set()
        for sample in range(self.num_samples):
            point = {key: dist.draw(rng) for key, dist in self.sample.items()} if self.search.algorithm == "random" else {}
            for cell in cells:
                params = {**point, **_cell_params(cell)}
                if self.search.algorithm == "tpe":
                    if sample > 0 and self.sample and all(k in cell for k in self.sample):
                        continue  # nothing left to sample in this cell
                else:
                    signature = json.dumps(params, sort_keys=True, default=str)
                    if signature in seen:
                        continue
                    seen.add(signature)
                yield f"t{index:04d}", params, cell
                index += 1

    def validate_trials(self, partition: str | None) -> list[TrialPlan]:
        """Plan the trials and check every config they can take (sampled extremes included)."""
        for cell in self.cells():
            flat = _cell_params(cell)
            for key, dist in self.sample.items():
                if key in flat:
                    continue  # pinned by this cell
                for value in dist.extremes():
                    self.resolve({key: value, **flat}, partition, label=f"sample.{key} at {value!r}")
        trials = self.plan(partition)
        if self.scheduler.name == "asha":
            _check_asha(self, trials)
        return trials

    def to_yaml(self) -> str:
        """The sweep as a self-contained YAML (base inlined): what a resumed sweep reads back."""
        return yaml.safe_dump(_yaml_tree(self), sort_keys=False)


def _check_asha(spec: SweepSpec, trials: list[TrialPlan]) -> None:
    """ASHA needs the metric during training, and a grace period within the trials' epochs."""
    for t in trials:
        if METRICS[spec.metric][1] and t.config["train"]["eval_every"] == 0 and spec.metric == "knn_acc":
            raise SweepError(
                f"scheduler.name asha needs knn_acc every epoch, but trial {t.trial_id} has train.eval_every 0"
            )
    max_epochs = max(t.config["train"]["epochs"] for t in trials)
    max_t = spec.scheduler.max_t or max_epochs
    if spec.scheduler.grace_period > max_t:
        raise SweepError(
            f"scheduler.grace_period must be <= max_t ({max_t} epochs), got {spec.scheduler.grace_period}"
        )


def _yaml_tree(spec: SweepSpec) -> dict:
    """The sweep file's mapping of ``spec``: :func:`load_sweep` of it gives the same spec back."""
    return {
        "name": spec.name,
        "description": spec.description,
        "base": spec.base,
        "overrides": spec.overrides,
        "grid": spec.grid,
        "sample": {k: d.to_yaml() for k, d in spec.sample.items()},
        "num_samples": spec.num_samples,
        "metric": spec.metric,
        "mode": spec.mode,
        "scheduler": {
            "name": spec.scheduler.name,
            "grace_period": spec.scheduler.grace_period,
            "reduction_factor": spec.scheduler.reduction_factor,
            "max_t": spec.scheduler.max_t,
            "group_by": list(spec.scheduler.group_by),
        },
        "search": {"algorithm": spec.search.algorithm, "seed": spec.search.seed,
                   "n_startup_trials": spec.search.n_startup_trials},
        "max_concurrent": spec.max_concurrent,
        "max_trials": spec.max_trials,
        "launch": spec.launch,
        "poll_interval_s": spec.poll_interval_s,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _get_dotted(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _cell_params(cell: dict) -> dict:
    """A grid cell (dotted key -> value, variants already merged by :meth:`SweepSpec.cells`) as a
    new dict of trial params, so a trial's params never alias the cell they came from."""
    return dict(cell)


# ---------------------------------------------------------------------------------- parsing


def _canonical(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise SweepError(f"{where}: axis names must be strings, got {key!r}")
    dotted = ALIASES.get(key, key)
    if dotted == "launch.partition":
        raise _no_partition(f"{where}.{key}")
    if dotted not in config_keys():
        sections = ", ".join(SECTIONS)
        raise SweepError(
            f"unknown key {where}.{key} (use a dotted config key like optim.rho, sections {sections}; "
            f"or an alias: {', '.join(ALIASES)})"
        )
    return dotted


def _check_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping, got {value!r}")
    return value


def _check_unknown(tree: dict, allowed: tuple, where: str) -> None:
    for key in tree:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise SweepError(f"unknown key {prefix}{key} (allowed: {', '.join(allowed)})")


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise SweepError(f"{key} must be >= {minimum}, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _distribution(key: str, value: Any) -> Distribution:
    where = f"sample.{key}"
    if not isinstance(value, dict) or len(value) != 1:
        raise SweepError(
            f"{where} must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
            f"{{randint: [low, high]}}, {{choice: [...]}}, got {value!r}"
        )
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"unknown distribution {where}.{kind} (allowed: {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SweepError(f"{where}.choice must be a non-empty list, got {args!r}")
        return Distribution("choice", values=tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise SweepError(f"{where}.{kind} must be [low, high], got {args!r}")
    low, high = (_number(a, f"{where}.{kind}") for a in args)
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}.loguniform low must be > 0, got {args[0]!r}")
    if low >= high:
        raise SweepError(f"{where}.{kind} low must be < high, got [{args[0]!r}, {args[1]!r}]")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise SweepError(f"{where}.randint bounds must be integers, got {args!r}")
    return Distribution(kind, low=low, high=high)


def _grid(tree: dict) -> dict:
    grid: dict = {}
    for key, values in tree.items():
        if key == "variants":
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid.variants must be a non-empty list of mappings, got {values!r}")
            variants = []
            for i, variant in enumerate(values):
                if not isinstance(variant, dict) or not variant:
                    raise SweepError(f"grid.variants[{i}] must be a non-empty mapping of dotted keys, got {variant!r}")
                variants.append({_canonical(k, f"grid.variants[{i}]"): v for k, v in variant.items()})
            grid["variants"] = variants
            continue
        dotted = _canonical(key, "grid")
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key} must be a non-empty list of values, got {values!r}")
        if dotted in grid:
            raise SweepError(f"grid.{key} repeats the axis {dotted}")
        grid[dotted] = list(values)
    variant_keys = {k for v in grid.get("variants", []) for k in v}
    for dotted in grid:
        if dotted in variant_keys:
            raise SweepError(f"grid.{dotted} is also set by grid.variants: give it in one place")
    return grid


def _absolute_paths(base: dict, relative_to: Path) -> dict:
    """Make the data paths of the base absolute: trials run in other folders and on other nodes."""
    base = copy.deepcopy(base)
    data = base.get("data")
    if isinstance(data, dict):
        for key in DATA_PATH_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                data[key] = str((relative_to / value).resolve())
    return base


def _no_partition(where: str) -> SweepError:
    """The one refusal of a partition inside a sweep file: it belongs to the command line."""
    return SweepError(f"{where}: give the partition on the command line (--partition), not in the sweep")


def _read_tree(source: str | os.PathLike | dict, name: str | None) -> tuple[dict, Path, str | None, str]:
    """(the sweep's mapping, the folder its relative ``base`` is read from, its file, its default name)."""
    if isinstance(source, dict):
        return copy.deepcopy(source), Path.cwd(), None, name or "sweep"
    path = Path(source)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise SweepError(f"sweep file {path} must hold a mapping (keys: {', '.join(TOP_LEVEL_KEYS)})")
    return tree, path.resolve().parent, str(path), name or f"{path.resolve().parent.name}-{path.stem}"


def _base(value: Any, folder: Path) -> dict:
    """``base:``: a training YAML (relative to the sweep file) or inline sections; data paths made
    absolute against the current directory, where the user types the command."""
    if value is None:
        base = {}
    elif isinstance(value, str):
        base_path = (folder / value) if not os.path.isabs(value) else Path(value)
        if not base_path.is_file():
            raise SweepError(f"base: training config {base_path} does not exist")
        base = yaml.safe_load(base_path.read_text()) or {}
        if not isinstance(base, dict):
            raise SweepError(f"base: {base_path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    elif isinstance(value, dict):
        base = value
    else:
        raise SweepError(f"base must be a path to a training YAML or a mapping of sections, got {value!r}")
    for section in base:
        if section not in SECTIONS:
            raise SweepError(f"unknown key base.{section} (allowed: {', '.join(SECTIONS)})")
    return _absolute_paths(base, Path.cwd())


def _overrides(value: Any, base: dict) -> dict:
    overrides = {_canonical(key, "overrides"): v for key, v in _check_mapping(value, "overrides").items()}
    if "launch.partition" in overrides or "partition" in (base.get("launch") or {}):
        raise _no_partition("launch.partition")
    return overrides


def _sample(value: Any, grid: dict) -> dict:
    sample = {}
    for key, spec in _check_mapping(value, "sample").items():
        dotted = _canonical(key, "sample")
        if dotted in sample:
            raise SweepError(f"sample.{key} repeats the axis {dotted}")
        if dotted in grid:
            raise SweepError(f"sample.{key} is also a grid axis: give {dotted} in one place")
        if dotted.startswith("data."):
            raise SweepError(
                f"sample.{key}: data keys must be grid axes (datasets are prepared before the trials start)"
            )
        sample[dotted] = _distribution(key, spec)
    if not grid and not sample:
        raise SweepError("empty search space: give grid axes, sample axes or both")
    return sample


def _metric_and_mode(tree: dict) -> tuple[str, str]:
    metric = tree.get("metric", "knn_acc")
    if metric not in METRICS:
        raise SweepError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    mode = tree.get("mode", METRICS[metric][0])
    if mode not in ("max", "min"):
        raise SweepError(f"mode must be one of max, min, got {mode!r}")
    return metric, mode


def _scheduler(value: Any, metric: str) -> SchedulerSpec:
    """``scheduler:``: a name (``none``, ``asha``) or a mapping of :data:`SCHEDULER_KEYS`."""
    if isinstance(value, str) or value is None:
        value = {"name": value or "none"}
    tree = _check_mapping(value, "scheduler")
    _check_unknown(tree, SCHEDULER_KEYS, "scheduler")
    name = tree.get("name", "none")
    if name not in ("none", "asha"):
        raise SweepError(f"scheduler.name must be one of none, asha, got {name!r}")
    group_by = tree.get("group_by", list(DEFAULT_GROUP_BY))
    if not isinstance(group_by, list):
        raise SweepError(f"scheduler.group_by must be a list of dotted config keys, got {group_by!r}")
    group_by = tuple(_canonical(k, "scheduler.group_by") for k in group_by)
    reduction = _number(tree.get("reduction_factor", 2), "scheduler.reduction_factor")
    if reduction <= 1:
        raise SweepError(f"scheduler.reduction_factor must be > 1, got {tree.get('reduction_factor')!r}")
    max_t = tree.get("max_t")
    scheduler = SchedulerSpec(
        name=name,
        grace_period=_int(tree.get("grace_period", 1), "scheduler.grace_period", 1),
        reduction_factor=reduction,
        max_t=None if max_t is None else _int(max_t, "scheduler.max_t", 1),
        group_by=group_by,
    )
    if scheduler.name == "asha" and not METRICS[metric][1]:
        reported = ", ".join(m for m, (_, live) in METRICS.items() if live)
        raise SweepError(
            f"metric {metric} arrives only when a trial ends: scheduler.name asha needs one reported during "
            f"training ({reported})"
        )
    return scheduler


def _search(value: Any, sample: dict) -> SearchSpec:
    """``search:``: an algorithm name (``random``, ``tpe``) or a mapping of :data:`SEARCH_KEYS`."""
    if isinstance(value, str) or value is None:
        value = {"algorithm": value or "random"}
    tree = _check_mapping(value, "search")
    _check_unknown(tree, SEARCH_KEYS, "search")
    algorithm = tree.get("algorithm", "random")
    if algorithm not in ("random", "tpe"):
        raise SweepError(f"search.algorithm must be one of random, tpe, got {algorithm!r}")
    if algorithm == "tpe" and not sample:
        raise SweepError("search.algorithm tpe needs sample axes (a pure grid has nothing to optimise)")
    return SearchSpec(
        algorithm=algorithm,
        seed=_int(tree.get("seed", 0), "search.seed", 0),
        n_startup_trials=_int(tree.get("n_startup_trials", 4), "search.n_startup_trials", 1),
    )


def _launch(value: Any) -> dict:
    """``launch:``: per-trial job resources, any field of the config's launch section but the partition."""
    launch = _check_mapping(value, "launch")
    if "partition" in launch:
        raise _no_partition("launch.partition")
    launch_fields = {k.split(".", 1)[1] for k in config_keys() if k.startswith("launch.")}
    for key in launch:
        if key not in launch_fields:
            raise SweepError(f"unknown key launch.{key} (allowed: {', '.join(sorted(launch_fields))})")
    return dict(launch)


def _check_budget(spec: SweepSpec) -> None:
    """The name, the poll interval, and the trial count against ``max_trials``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise SweepError(f"name must be letters, digits, '.', '_' or '-', got {spec.name!r}")
    if spec.poll_interval_s <= 0:
        raise SweepError(f"poll_interval_s must be > 0, got {spec.poll_interval_s!r}")
    n = spec.num_trials()
    if n <= 100 * spec.max_trials:  # count exactly (identical trials are planned once) unless absurd
        n = sum(1 for _ in spec.plan_params())
    if n > spec.max_trials:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in spec.grid.items())
        sizes = f"{sizes} x {spec.num_samples} samples" if sizes else f"{spec.num_samples} samples"
        raise SweepError(f"max_trials: the sweep has {sizes} = {n} distinct trials, more than max_trials {spec.max_trials}")


def load_sweep(source: str | os.PathLike | dict, *, name: str | None = None) -> SweepSpec:
    """Read and check a sweep definition (a YAML path or a mapping); raise :class:`SweepError`.

    A relative ``base`` path is read relative to the sweep file; relative data paths inside the
    base (``data.cache_dir``, ``data.root``) are made absolute against the current directory,
    where the user types the command. Each section has its parser above; they run in the order
    of the file's documentation, so the first wrong key is the one reported.
    """
    tree, folder, src, default_name = _read_tree(source, name)
    _check_unknown(tree, TOP_LEVEL_KEYS, "")
    base = _base(tree.get("base"), folder)
    overrides = _overrides(tree.get("overrides"), base)
    grid = _grid(_check_mapping(tree.get("grid"), "grid"))
    sample = _sample(tree.get("sample"), grid)
    num_samples = _int(tree.get("num_samples", 1), "num_samples", 1)
    metric, mode = _metric_and_mode(tree)
    scheduler = _scheduler(tree.get("scheduler", "none"), metric)
    search = _search(tree.get("search", "random"), sample)
    launch = _launch(tree.get("launch"))
    spec = SweepSpec(
        name=str(tree.get("name") or default_name),
        base=base,
        overrides=overrides,
        grid=grid,
        sample=sample,
        num_samples=num_samples,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        search=search,
        max_concurrent=_int(tree.get("max_concurrent", 4), "max_concurrent", 1),
        max_trials=_int(tree.get("max_trials", DEFAULT_MAX_TRIALS), "max_trials", 1),
        launch=launch,
        poll_interval_s=_number(tree.get("poll_interval_s", 0.5), "poll_interval_s"),
        description=str(tree.get("description") or ""),
        source=src,
    )
    _check_budget(spec)
    return spec
