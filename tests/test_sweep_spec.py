"""Sweep definitions: parsing, trial planning, and one-line errors before anything is submitted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ltssl.config import DATA_PATH_KEYS
from ltssl.sweep import run_sweep
from ltssl.sweep.spec import SweepError, load_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP_CLI = REPO / "launch" / "sweep.py"


def write(tmp_path: Path, tree: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


BASE = {"data": {"dataset": "digits"}, "train": {"epochs": 2}}


def test_grid_and_sampled_axes_plan_every_trial(tmp_path):
    spec = load_sweep(write(tmp_path, {
        "base": BASE,
        "grid": {"imbalance_ratio": [1, 10], "seed": [0, 1]},
        "sample": {"rho": {"loguniform": [0.01, 10]}, "kde_alpha": {"uniform": [0, 2]},
                   "label_power_base": {"choice": [1.1, 1.2]}},
        "num_samples": 3,
    }))
    assert spec.name == f"{tmp_path.name}-sweep"
    trials = spec.validate_trials(None)
    assert [t.trial_id for t in trials] == [f"t{i:04d}" for i in range(12)]
    # aliases became dotted keys; every trial has the grid cell and the sampled values
    assert set(trials[0].params) == {"data.imbalance_ratio", "train.seed", "optim.rho", "optim.kde_alpha", "optim.label_power_base"}
    for t in trials:
        assert 0.01 <= t.params["optim.rho"] <= 10 and 0 <= t.params["optim.kde_alpha"] <= 2
        assert t.params["optim.label_power_base"] in (1.1, 1.2)
        assert t.config["optim"]["rho"] == t.params["optim.rho"]
        assert t.config["launch"]["partition"] is None and t.config["train"]["epochs"] == 2
    # the i-th sampled point runs in every grid cell (ratios and seeds compared at equal rho)
    by_sample = [trials[i * 4:(i + 1) * 4] for i in range(3)]
    for block in by_sample:
        assert len({t.params["optim.rho"] for t in block}) == 1
        assert {(t.params["data.imbalance_ratio"], t.params["train.seed"]) for t in block} == {(1, 0), (1, 1), (10, 0), (10, 1)}
    assert trials[0].group == "digits/r=1/lt/simsiam" and trials[1].group == "digits/r=1/lt/simsiam"
    assert trials[2].group == "digits/r=10/lt/simsiam"
    # planning is deterministic (a resumed sweep plans the same trials)
    again = load_sweep(write(tmp_path, yaml.safe_load((tmp_path / "sweep.yaml").read_text()), "again.yaml")).plan(None)
    assert [t.params for t in again] == [t.params for t in trials]


def test_variants_pin_sampled_keys_and_identical_trials_run_once(tmp_path):
    spec = load_sweep(write(tmp_path, {
        "base": BASE,
        "grid": {"variants": [{"optimizer": "sgd", "rho": 0.0}, {"optimizer": "rwsam", "weighting": "label_power"}]},
        "sample": {"rho": {"loguniform": [0.5, 10]}},
        "num_samples": 4,
    }))
    trials = spec.plan(None)
    sgd = [t for t in trials if t.config["optim"]["name"] == "sgd"]
    assert len(sgd) == 1 and sgd[0].config["optim"]["rho"] == 0.0
    assert len(trials) == 5


def test_base_file_relative_to_the_sweep_and_resolved_yaml_round_trips(tmp_path):
    (tmp_path / "train.yaml").write_text("data: {dataset: digits, cache_dir: cache}\ntrain: {epochs: 3}\n")
    spec = load_sweep(write(tmp_path, {"base": "train.yaml", "grid": {"seed": [0, 1]},
                                       "scheduler": {"name": "asha", "grace_period": 1}}))
    assert spec.base["train"]["epochs"] == 3
    assert os.path.isabs(spec.base["data"]["cache_dir"])  # jobs run elsewhere
    again = load_sweep(yaml.safe_load(spec.to_yaml()))
    assert again.plan(None)[1].config == spec.plan(None)[1].config
    assert again.scheduler == spec.scheduler


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"grid": {"seed": [0]}, "schedular": "asha"}, "unknown key schedular (allowed: name, description, base,"),
        ({"grid": {"optim.rhoo": [1]}}, "unknown key grid.optim.rhoo (use a dotted config key like optim.rho"),
        ({"sample": {"rho": {"loguniform": [0, 1]}}}, "sample.rho.loguniform low must be > 0, got 0"),
        ({"sample": {"rho": {"loguniform": [-1, 1]}}}, "sample.rho.loguniform low must be > 0, got -1"),
        ({"sample": {"kde_alpha": {"uniform": [2, 1]}}}, "sample.kde_alpha.uniform low must be < high, got [2, 1]"),
        ({"sample": {"kde_alpha": {"uniform": [1, 1]}}}, "sample.kde_alpha.uniform low must be < high, got [1, 1]"),
        ({"sample": {"rho": {"normal": [0, 1]}}}, "unknown distribution sample.rho.normal (allowed: loguniform, uniform, choice, randint)"),
        ({"sample": {"label_power_base": {"choice": []}}}, "sample.label_power_base.choice must be a non-empty list, got []"),
        ({"grid": {}, "sample": {}}, "empty search space: give grid axes, sample axes or both"),
        ({"base": BASE}, "empty search space: give grid axes, sample axes or both"),
        ({"grid": {"imbalance_ratio": [1, 10, 100], "seed": [0, 1, 2, 3]}, "sample": {"rho": {"uniform": [0.1, 2]}},
          "num_samples": 10, "max_trials": 50},
         "max_trials: the sweep has 3 data.imbalance_ratio x 4 train.seed x 10 samples = 120 distinct trials, more than max_trials 50"),
        ({"grid": {"imbalance_ratio": [10, 0.5]}}, "trial t0001 (data.imbalance_ratio=0.5): data.imbalance_ratio must be >= 1, got 0.5"),
        ({"grid": {"optim.weighting": ["kde", "focal"]}},
         "trial t0001 (optim.weighting=focal): optim.weighting must be one of none, label_power, kde, got 'focal'"),
        ({"grid": {"seed": [0]}, "sample": {"optim.momentum": {"uniform": [0.5, 1.5]}}},
         "sample.optim.momentum at 1.5 (optim.momentum=1.5, train.seed=0): optim.momentum must be <= 1, got 1.5"),
        ({"grid": {"seed": [0]}, "metric": "linear_acc", "scheduler": {"name": "asha"}},
         "metric linear_acc arrives only when a trial ends: scheduler.name asha needs one reported during training"),
        ({"grid": {"seed": [0]}, "scheduler": {"name": "asha", "grace_period": 5}},
         "scheduler.grace_period must be <= max_t (2 epochs), got 5"),
        ({"grid": {"seed": [0]}, "scheduler": {"name": "hyperband"}}, "scheduler.name must be one of none, asha, got 'hyperband'"),
        ({"grid": {"seed": [0]}, "scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor must be > 1, got 1"),
        ({"grid": {"seed": [0]}, "search": {"algorithm": "bayes"}}, "search.algorithm must be one of random, tpe, got 'bayes'"),
        ({"grid": {"seed": [0]}, "search": "tpe"}, "search.algorithm tpe needs sample axes"),
        ({"grid": {"seed": [0]}, "metric": "accuracy"}, "metric must be one of knn_acc, loss, linear_acc,"),
        ({"grid": {"seed": [0]}, "mode": "maximise"}, "mode must be one of max, min, got 'maximise'"),
        ({"grid": {"seed": [0]}, "num_samples": 0}, "num_samples must be >= 1, got 0"),
        ({"grid": {"seed": [0]}, "launch": {"partition": "gpu"}}, "launch.partition: give the partition on the command line (--partition)"),
        ({"grid": {"seed": [0]}, "launch": {"gpus": 1}}, "unknown key launch.gpus (allowed: account,"),
        ({"grid": {"seed": 0}}, "grid.seed must be a non-empty list of values, got 0"),
        ({"grid": {"rho": [1]}, "sample": {"rho": {"uniform": [0.1, 2]}}}, "sample.rho is also a grid axis: give optim.rho in one place"),
        ({"sample": {"imbalance_ratio": {"uniform": [1, 10]}}}, "sample.imbalance_ratio: data keys must be grid axes"),
        ({"base": "missing.yaml", "grid": {"seed": [0]}}, "base: training config"),
        ({"base": {"optimizer": {"rho": 1}}, "grid": {"seed": [0]}}, "unknown key base.optimizer (allowed: data, model, method, optim, train, eval, launch, tracking)"),
    ],
)
def test_bad_sweeps_name_the_key(tmp_path, tree, message):
    tree = {"base": BASE, **tree}
    with pytest.raises(SweepError) as info:
        load_sweep(write(tmp_path, tree)).validate_trials(None)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_bad_sweep_on_the_command_line_submits_nothing(tmp_path):
    """One line on stderr, exit 2, no output folder, no Ray."""
    bad = write(tmp_path, {"base": BASE, "sample": {"rho": {"loguniform": [0, 10]}}})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SWEEP_CLI), "--config", str(bad), "--output-dir", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sweep: sample.rho.loguniform low must be > 0, got 0"
    assert not out.exists() and not (tmp_path / "results").exists()


def test_a_bad_dataset_is_refused_before_any_trial(tmp_path, monkeypatch):
    """The preflight (child process) refuses a missing dataset folder: nothing submitted."""
    import importlib

    launch_submit = importlib.import_module("ltssl.launch.submit")

    def no_submit(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("submitted")

    monkeypatch.setattr(launch_submit, "submit", no_submit)
    monkeypatch.chdir(tmp_path)
    sweep = write(tmp_path, {"base": {"data": {"dataset": "cifar10", "root": str(tmp_path / "no-cifar")}},
                             "grid": {"seed": [0]}})
    with pytest.raises(SweepError) as info:
        run_sweep(sweep, output_dir=tmp_path / "out")
    assert "data.root" in str(info.value) and "no-cifar" in str(info.value) and "does not exist" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_trials(tmp_path):
    sweep = write(tmp_path, {"base": BASE, "grid": {"imbalance_ratio": [1, 10]}})
    proc = subprocess.run([sys.executable, str(SWEEP_CLI), "--config", str(sweep), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 trials" in proc.stdout and "t0001 [digits/r=10/lt/simsiam] data.imbalance_ratio=10" in proc.stdout


SHIPPED = sorted(p for p in (REPO / "sweeps").glob("*/*.yaml") if p.name != "train.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_shipped_sweeps_are_valid(path):
    spec = load_sweep(path)
    trials = spec.validate_trials("gpu" if path.parent.name != "digits_lt" else None)
    assert 0 < len(trials) <= spec.max_trials
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)


def test_every_required_sweep_is_shipped():
    names = {f"{p.parent.name}/{p.name}" for p in SHIPPED}
    assert {"digits_lt/default.yaml", "cifar10_lt/rwsam.yaml", "cifar100_lt/rwsam.yaml", "imagenet_lt/rwsam.yaml",
            "digits_lt/delta.yaml", "cifar10_lt/delta.yaml", "cifar100_lt/delta.yaml"} <= names


def test_every_data_path_of_the_base_is_made_absolute():
    """Trials run in other folders and on other nodes: test_split_file too (it was left relative)."""
    spec = load_sweep(REPO / "sweeps" / "imagenet_lt" / "rwsam.yaml")
    data = spec.base["data"]
    given = [key for key in DATA_PATH_KEYS if data.get(key)]
    assert "test_split_file" in given
    assert all(os.path.isabs(data[key]) for key in given), {key: data[key] for key in given}
