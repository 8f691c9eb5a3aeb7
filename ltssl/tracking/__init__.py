"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) fed from a training job's metrics lines.

The training loop calls :func:`open_tracker` once on rank 0, ``tracker.log(line)`` for every line it
writes to ``metrics.jsonl`` (the ``resumed`` line of a resumed job included) and
``tracker.close(result)`` at the end, after ``result.json`` is written (``result`` is the job's
result dict, or None when the job stops early). A tracker never fails a job: its first error is
logged once, then that tracker goes quiet and training continues. ``metrics.jsonl`` and the
results parquet stay the source of truth.

Which trackers run is the config's ``tracking`` section: TensorBoard (on by default; event files in
the run folder), W&B (``tracking.wandb_project``), MLflow (``tracking.mlflow``). A trial's run is
named after the sweep folder layout (``<sweep>/trials/<trial_id>``: sweep id = the sweep folder's
name). Before anything is submitted, :func:`check` refuses a tracker that cannot work (not
installed, W&B not logged in); the sweep driver calls :func:`sweep_parent` for MLflow's parent run.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from ltssl.config import ConfigError
from ltssl.tracking.common import RunIdentity, Tracker, wandb_mode

__all__ = ["Tracker", "RunIdentity", "open_tracker", "check", "sweep_parent", "end_sweep_parent"]

log = logging.getLogger(__name__)

#: tracker name -> (module, class) under ltssl.tracking; each module imports its tracker's package
#: (wandb, mlflow, tensorboard: about a second each), so only the enabled ones are imported.
TRACKERS = {
    "tensorboard": ("ltssl.tracking.tensorboard", "TensorBoardTracker"),
    "wandb": ("ltssl.tracking.wandb_run", "WandbTracker"),
    "mlflow": ("ltssl.tracking.mlflow_run", "MlflowTracker"),
}
#: the Python package each tracker needs, as installed by `make install` (requirements.txt)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def enabled(cfg: Any) -> list[str]:
    """The trackers ``cfg.tracking`` asks for (none for a config without the section)."""
    t = getattr(cfg, "tracking", None)
    if t is None:
        return []
    wanted = {"tensorboard": t.tensorboard, "wandb": t.wandb_project is not None, "mlflow": t.mlflow}
    return [name for name, on in wanted.items() if on]


class Guarded(Tracker):
    """One tracker whose first error (opening, logging or closing) is logged once and turns it off."""

    def __init__(self, name: str, make: Callable[[], Tracker]):
        self.name = name
        self.inner: Tracker | None = None
        self.failed = False
        self._call(lambda: setattr(self, "inner", make()))

    def _call(self, fn: Callable[[], Any]) -> None:
        if self.failed:
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - a tracker must never fail the job
            self.failed = True
            log.warning("tracking: %s is off for the rest of this job after an error (training continues): %s: %s",
                        self.name, type(error).__name__, error, exc_info=True)

    def log(self, line: dict[str, Any]) -> None:
        if self.inner is not None:
            self._call(lambda: self.inner.log(line))

    def close(self, result: dict[str, Any] | None) -> None:
        if self.inner is not None:
            self._call(lambda: self.inner.close(result))
        self.inner = None


class Trackers(Tracker):
    """Several trackers fed the same lines, each guarded on its own."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, line: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(line)

    def close(self, result: dict[str, Any] | None) -> None:
        for tracker in self.trackers:
            tracker.close(result)


def _make(name: str, cfg: Any, ident: RunIdentity) -> Callable[[], Tracker]:
    module, cls = TRACKERS[name]
    return lambda: getattr(importlib.import_module(module), cls)(cfg, ident)


def open_tracker(cfg: Any, run_dir: str | Path) -> Tracker:
    """The trackers ``cfg`` asks for, as one :class:`Tracker` (call on rank 0 only)."""
    names = enabled(cfg)
    if not names:
        return Tracker()
    ident = RunIdentity.of(run_dir)
    return Trackers([Guarded(name, _make(name, cfg, ident)) for name in names])


# ----------------------------------------------------------------------------- before submitting


def _wandb_logged_in() -> bool:
    """W&B credentials without a network call: WANDB_API_KEY, an identity token file, or a netrc
    entry (``wandb login`` writes one) for the W&B host (WANDB_BASE_URL, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check(cfg: Any) -> None:
    """Raise a one-line :class:`ConfigError` when a tracker ``cfg`` asks for cannot work: its
    package is not installed, or W&B runs online without credentials. No network, no import."""
    for name in enabled(cfg):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            key = {"tensorboard": "tracking.tensorboard", "wandb": "tracking.wandb_project", "mlflow": "tracking.mlflow"}[name]
            raise ConfigError(f"{key}: the {PACKAGES[name]} package is not installed (make install installs it)")
    t = cfg.tracking
    if t.wandb_project is not None:
        if wandb_mode(cfg) not in ("offline", "disabled", "dryrun") and not _wandb_logged_in():
            raise ConfigError(
                f"tracking.wandb_project {t.wandb_project!r}: not logged in to W&B (run `wandb login`, set WANDB_API_KEY, "
                "or tracking.wandb_mode=offline)"
            )


def sweep_parent(cfg: Any, sweep_dir: str | os.PathLike, params: dict[str, Any] | None = None) -> str | None:
    """MLflow's parent run of a sweep (see :func:`ltssl.tracking.mlflow_run.sweep_parent`); None when
    MLflow is off or fails (logged: the sweep goes on, its trials make the parent themselves)."""
    if "mlflow" not in enabled(cfg):
        return None
    try:
        return importlib.import_module("ltssl.tracking.mlflow_run").sweep_parent(cfg, sweep_dir, params)
    except Exception as error:  # noqa: BLE001 - a tracker must never fail the sweep
        log.warning("tracking: MLflow parent run of %s not made: %s: %s", sweep_dir, type(error).__name__, error)
        return None


def end_sweep_parent(cfg: Any, sweep_dir: str | os.PathLike, status: str = "FINISHED") -> None:
    """Mark MLflow's parent run of the sweep ended (FINISHED, FAILED or KILLED); errors are logged."""
    if "mlflow" not in enabled(cfg):
        return
    try:
        importlib.import_module("ltssl.tracking.mlflow_run").end_sweep_parent(cfg, sweep_dir, status)
    except Exception as error:  # noqa: BLE001 - a tracker must never fail the sweep
        log.warning("tracking: MLflow parent run of %s not ended: %s: %s", sweep_dir, type(error).__name__, error)
