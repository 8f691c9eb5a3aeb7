"""The sweep folder: a new one or one to resume, its ``sweep.yaml``/``sweep.json``, and the one-driver lock.

``results/<name>-<timestamp>/`` holds ``sweep.yaml`` (the sweep, base inlined: what a resumed
sweep reads back), ``sweep.json`` (id, partition, target, git commit), ``ledger/`` and
``trials/``. A second driver on a folder that a driver holds is refused in one line
(:func:`driver_lock`), before it changes anything there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import yaml

from ltssl.io import atomic_write_text
from ltssl.launch.job import DEFAULT_TARGET, REPO_ROOT
from ltssl.launch.submit import git_info
from ltssl.sweep.ledger import DETACH_MARKER
from ltssl.sweep.session import SweepRun
from ltssl.sweep.spec import SweepError, SweepSpec, load_sweep

DEFAULT_SWEEP = REPO_ROOT / "sweeps" / "digits_lt" / "default.yaml"


def default_output_dir(spec: SweepSpec, root: Path | None = None) -> Path:
    return (root or Path("results")) / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_output_dir(name: str, root: Path | None = None) -> Path | None:
    """The newest ``results/<name>-*`` folder holding a sweep, for ``--resume`` without a folder."""
    root = root or Path("results")
    found = sorted((p for p in root.glob(f"{name}-*") if (p / "sweep.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def with_tracking(spec: SweepSpec, tracking: dict | None) -> SweepSpec:
    """``spec`` with ``tracking`` (``{"wandb_project": ..., "mlflow": ..., ...}``, keys of the
    config's ``tracking`` section) added to the overrides of every trial; ``sweep.yaml`` keeps them."""
    for key, value in (tracking or {}).items():
        spec.overrides[f"tracking.{key}"] = value
    return spec


def open_new(config, output_dir, partition: str | None, target: str | None, target_kwargs: dict | None,
             tracking: dict | None = None) -> SweepRun:
    """A new sweep from ``config`` (default :data:`DEFAULT_SWEEP`) into ``output_dir``; nothing written yet.
    ``tracking``: tracker settings for every trial (:func:`with_tracking`)."""
    spec = with_tracking(load_sweep(config or DEFAULT_SWEEP), tracking)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(spec)
    if (output_dir / "sweep.json").is_file():
        raise SweepError(f"--output-dir {output_dir} already holds a sweep: add --resume to continue it")
    return SweepRun(spec=spec, output_dir=output_dir, sweep_id=output_dir.resolve().name, partition=partition,
                    target=target or DEFAULT_TARGET, target_kwargs=target_kwargs)


def open_resumed(config, output_dir, partition: str | None, target: str | None, target_kwargs: dict | None) -> SweepRun:
    """The sweep in ``output_dir`` (default: the newest of ``config``'s name), as it was started."""
    if output_dir is None:
        name = load_sweep(config or DEFAULT_SWEEP).name
        found = latest_output_dir(name)
        if found is None:
            raise SweepError(f"--resume: no results/{name}-* folder with a sweep to resume (give --output-dir)")
        output_dir = found
    output_dir = Path(output_dir)
    if not (output_dir / "sweep.json").is_file():
        raise SweepError(f"--resume: {output_dir} holds no sweep (no sweep.json)")
    meta, tree = _read_sweep_files(output_dir)
    spec = load_sweep(tree, name=meta["name"])
    if partition is not None and partition != meta.get("partition"):
        raise SweepError(
            f"--partition {partition}: this sweep was started with {meta.get('partition') or 'local jobs'}; resume without --partition"
        )
    if target_kwargs is None:
        target_kwargs = meta.get("target_kwargs") or None
    return SweepRun(spec=spec, output_dir=output_dir, sweep_id=meta["sweep_id"], partition=meta.get("partition"),
                    target=target or meta.get("target") or DEFAULT_TARGET, target_kwargs=target_kwargs, resume=True)


def _read_sweep_files(output_dir: Path) -> tuple[dict, dict]:
    """``sweep.json`` and ``sweep.yaml`` of a sweep folder; a SweepError in one line if either is unreadable."""
    try:
        meta = json.loads((output_dir / "sweep.json").read_text())
        tree = yaml.safe_load((output_dir / "sweep.yaml").read_text())
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("name", "sweep_id")):
            raise ValueError("sweep.json has no name and sweep_id")
        if not isinstance(tree, dict):
            raise ValueError("sweep.yaml holds no mapping")
    except (OSError, ValueError, yaml.YAMLError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SweepError(f"--resume: {output_dir} is not a readable sweep folder: {first}") from None
    return meta, tree


def check_still_new(run: SweepRun) -> None:
    """A new sweep, with its folder locked: refuse if another driver wrote a sweep there meanwhile."""
    if (run.output_dir / "sweep.json").is_file():
        raise SweepError(f"--output-dir {run.output_dir} already holds a sweep: add --resume to continue it")


def prepare_folder(run: SweepRun) -> None:
    """A new sweep: ``sweep.yaml`` and ``sweep.json``. Either way, a new driver is not detached."""
    (run.output_dir / DETACH_MARKER).unlink(missing_ok=True)
    if run.resume:
        return
    atomic_write_text(run.output_dir / "sweep.yaml", run.spec.to_yaml())
    spec = run.spec
    meta = {"sweep_id": run.sweep_id, "name": spec.name, "source": spec.source, "partition": run.partition,
            "created": time.time(), "num_trials": len(run.trials), "metric": spec.metric, "mode": spec.mode,
            "target": run.target, "target_kwargs": run.target_kwargs or {}, **git_info()}
    atomic_write_text(run.output_dir / "sweep.json", json.dumps(meta, indent=1))


@contextlib.contextmanager
def driver_lock(output_dir: Path):
    """One driver per sweep folder: a second one (a --resume while the first still runs) would
    hand out the same pending trials again."""
    path = output_dir / ".driver.lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise SweepError(f"another driver (pid {holder}) is running the sweep in {output_dir}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
