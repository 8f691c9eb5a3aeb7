"""Refusals before anything is submitted (issue 14, fault 8 and the trackers): one line each, naming
the field and what to do; the sweep CLI's --dry-run runs the same checks as a real start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltssl.config import load_config
from ltssl.launch import LaunchError, preflight
from ltssl.sweep.folder import open_new

REPO = Path(__file__).resolve().parents[1]
SWEEP_CLI = REPO / "launch" / "sweep.py"
DIGITS_SWEEP = REPO / "sweeps" / "digits_lt" / "default.yaml"


def _cfg(tmp_path: Path, **overrides):
    return load_config(None, {"data.cache_dir": str(tmp_path / "cache"), **overrides})


def _no_wandb_login(monkeypatch, home: Path) -> dict:
    """This process and a child's environment without W&B credentials (HOME empty: no ~/.netrc)."""
    home.mkdir(exist_ok=True)
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    return dict(os.environ)


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP_CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_cifar_folder_is_one_line_that_says_how_to_get_it(tmp_path):
    """A fresh clone has no data/: the dry run names data.root, the archive and where it unpacks."""
    proc = _cli(["--config", str(REPO / "sweeps" / "cifar10_lt" / "rwsam.yaml"), "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "data.root" in line and "cifar-10-batches-py" in line and "does not exist" in line
    assert "cifar-10-python.tar.gz" in line
    assert f"-C {tmp_path / 'data'}" in line, line  # where it unpacks: under the sweep's data.root


def test_a_missing_ood_folder_names_data_ood_root_and_how_to_get_it(tmp_path):
    cfg = _cfg(tmp_path, **{"data.ood_dataset": "cifar100", "data.ood_root": str(tmp_path / "nope" / "cifar-100-python")})
    with pytest.raises(LaunchError) as info:
        preflight(cfg, check_names=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"data.ood_root {tmp_path / 'nope' / 'cifar-100-python'} does not exist")
    assert "cifar-100-python.tar.gz" in message


def test_a_ratio_that_contradicts_the_split_file_is_refused_before_submitting(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    split = tmp_path / "train.txt"
    split.write_text("".join(f"a/{i}.jpg 0\n" for i in range(6)) + "".join(f"b/{i}.jpg 1\n" for i in range(2)))
    cfg = _cfg(tmp_path, **{"data.dataset": "imagefolder", "data.root": str(root), "data.split_file": str(split),
                            "data.imbalance_ratio": 100.0})
    with pytest.raises(LaunchError) as info:
        preflight(cfg, check_names=False)
    message = str(info.value)
    assert "\n" not in message
    assert "data.imbalance_ratio 100 contradicts split file" in message and "6 / 2 = 3" in message


def test_wandb_online_without_login_is_refused_in_preflight(tmp_path, monkeypatch):
    _no_wandb_login(monkeypatch, tmp_path / "home")
    cfg = _cfg(tmp_path, **{"tracking.wandb_project": "ltssl-test", "tracking.wandb_mode": "online"})
    with pytest.raises(LaunchError) as info:
        preflight(cfg, check_names=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("tracking.wandb_project 'ltssl-test': not logged in to W&B") and "wandb login" in message
    offline = _cfg(tmp_path, **{"tracking.wandb_project": "ltssl-test", "tracking.wandb_mode": "offline"})
    preflight(offline, check_names=False)  # the same job offline needs no login: accepted


def test_sweep_cli_wandb_flag_reaches_the_trackers_check_and_is_refused_with_resume(tmp_path, monkeypatch):
    env = _no_wandb_login(monkeypatch, tmp_path / "home")
    proc = _cli(["--config", str(DIGITS_SWEEP), "--dry-run", "--wandb", "ltssl-test"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "tracking.wandb_project 'ltssl-test': not logged in to W&B" in proc.stderr
    env["WANDB_MODE"] = "offline"
    proc = _cli(["--config", str(DIGITS_SWEEP), "--dry-run", "--wandb", "ltssl-test"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 trials" in proc.stdout
    proc = _cli(["--config", str(DIGITS_SWEEP), "--resume", "--mlflow"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "sweep: --wandb/--mlflow: a resumed sweep keeps the trackers in its sweep.yaml; resume without them"


def test_tracking_of_a_new_sweep_is_in_every_trial_config_and_in_its_sweep_yaml(tmp_path):
    run = open_new(DIGITS_SWEEP, tmp_path / "out", None, None, None,
                   tracking={"wandb_project": "ltssl-test", "mlflow": True, "mlflow_uri": "file:/tmp/mlruns"})
    trials = run.spec.plan(None)
    assert len(trials) == 8
    for trial in trials:
        assert trial.config["tracking"]["wandb_project"] == "ltssl-test"
        assert trial.config["tracking"]["mlflow"] is True and trial.config["tracking"]["mlflow_uri"] == "file:/tmp/mlruns"
    assert "tracking.wandb_project: ltssl-test" in run.spec.to_yaml()  # what --resume reads back
    plain = open_new(DIGITS_SWEEP, tmp_path / "out2", None, None, None)
    assert all(t.config["tracking"]["wandb_project"] is None for t in plain.spec.plan(None))
