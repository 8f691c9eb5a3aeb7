"""MLflow: one run per trial, nested under one parent run per sweep.

Tracking URI ``tracking.mlflow_uri``, by default the file store ``file:<sweep folder>/mlruns``
(a lone run: ``file:<run folder>/mlruns``). The parent run (name = the sweep id) is made once per
sweep by :func:`sweep_parent` (the driver calls it before the first job; a job calls it too, so a
trial never goes without its parent), its id kept in ``<sweep folder>/mlflow_parent.json``.

A trial's run (name = the trial id): params = the resolved config (dotted keys), metrics = every
numeric field of every metrics line at its ``step``, then the results row's numbers as final
metrics and its text fields as tags. A requeued job continues the same run (its id is kept in
``<run folder>/mlflow_run.json``) and skips the (metric, step) pairs the run already holds, so
re-run steps are not logged twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ltssl.io import atomic_write_json
from ltssl.tracking.common import RunIdentity, StepFilter, Tracker, flat_config, numeric_items, scalars, summary_row

PARENT_FILE = "mlflow_parent.json"
RUN_FILE = "mlflow_run.json"
#: MLflow's per-request limits (params/tags per batch, characters of a param value).
BATCH_PARAMS, MAX_PARAM_CHARS = 100, 6000


def tracking_uri(cfg: Any, folder: Path) -> str:
    """``tracking.mlflow_uri``, else the file store ``file:<folder>/mlruns``."""
    return cfg.tracking.mlflow_uri or f"file:{Path(folder).resolve() / 'mlruns'}"


def client_for(uri: str) -> MlflowClient:
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked; a local file store is this project's default.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # made meanwhile by another trial
        return client.get_experiment_by_name(name).experiment_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), BATCH_PARAMS):
        client.log_batch(run_id, params=items[i:i + BATCH_PARAMS])


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sweep_parent(cfg: Any, sweep_dir: str | os.PathLike, params: dict[str, Any] | None = None) -> str:
    """The MLflow parent run of the sweep in ``sweep_dir`` (made on the first call, marked running
    again on a later one, e.g. a resumed sweep); returns its run id. ``params`` (the sweep's own
    settings) are logged when it is made. One process at a time (a lock file in the sweep folder)."""
    sweep_dir = Path(sweep_dir).resolve()
    uri = tracking_uri(cfg, sweep_dir)
    client = client_for(uri)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".mlflow_parent.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _read(sweep_dir / PARENT_FILE)
        if known.get("tracking_uri") == uri:
            return known["run_id"]
        exp = experiment_id(client, cfg.tracking.mlflow_experiment)
        run = client.create_run(exp, run_name=sweep_dir.name, tags={"ltssl.sweep_id": sweep_dir.name, "ltssl.kind": "sweep"})
        log_params(client, run.info.run_id, params or {})
        atomic_write_json(sweep_dir / PARENT_FILE, {"tracking_uri": uri, "experiment_id": exp, "run_id": run.info.run_id})
        return run.info.run_id


def end_sweep_parent(cfg: Any, sweep_dir: str | os.PathLike, status: str = "FINISHED") -> None:
    """Mark the sweep's parent run ended (``FINISHED``, ``FAILED`` or ``KILLED``); no-op without one.

    A trial's job that was cancelled (stopped early by the scheduler) or killed never closes its
    run; at the sweep's end such child runs still marked RUNNING are ended as KILLED."""
    known = _read(Path(sweep_dir) / PARENT_FILE)
    if not known.get("run_id"):
        return
    client = client_for(known["tracking_uri"])
    children = client.search_runs([known["experiment_id"]], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{known['run_id']}'", max_results=50000)
    for child in children:
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")
    client.set_terminated(known["run_id"], status)


class MlflowTracker(Tracker):
    """One MLflow run per trial (see the module docstring)."""

    def __init__(self, cfg: Any, ident: RunIdentity):
        self.cfg, self.ident = cfg, ident
        self.uri = tracking_uri(cfg, ident.sweep_dir or ident.run_dir)
        self.client = client_for(self.uri)
        known = _read(ident.run_dir / RUN_FILE)
        if known.get("tracking_uri") == self.uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            held = self.client.get_run(self.run_id).data.metrics
            self.steps = StepFilter({k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in held})
            self.last_line: dict[str, float] = {}
            self.last_step = max(self.steps.last.values(), default=0)
            return
        tags = {"ltssl.trial_id": ident.trial_id, "ltssl.run_dir": str(ident.run_dir)}
        if ident.sweep_dir is not None:
            tags.update({MLFLOW_PARENT_RUN_ID: sweep_parent(cfg, ident.sweep_dir), "ltssl.sweep_id": ident.sweep_id})
        exp = experiment_id(self.client, cfg.tracking.mlflow_experiment)
        self.run_id = self.client.create_run(exp, run_name=ident.trial_id, tags=tags).info.run_id
        atomic_write_json(ident.run_dir / RUN_FILE, {"tracking_uri": self.uri, "run_id": self.run_id})
        log_params(self.client, self.run_id, flat_config(cfg))
        self.steps = StepFilter()
        self.last_line, self.last_step = {}, 0

    def log(self, line: dict[str, Any]) -> None:
        step = line.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        stamp = int(1000 * (line.get("time") or time.time()))
        values = self.steps.fresh(scalars(line), step)
        if values:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
            self.last_line, self.last_step = values, step

    def close(self, result: dict[str, Any] | None) -> None:
        if result is not None:
            row = summary_row(self.ident, self.cfg, result)
            stamp = int(1000 * time.time())
            final = {k: v for k, v in numeric_items(row).items() if self.last_line.get(k) != v}
            texts = [RunTag(f"result.{k}", str(v)[:MAX_PARAM_CHARS]) for k, v in row.items()
                     if isinstance(v, str) and k not in ("config_json", "run_dir")]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, self.last_step) for k, v in final.items()], tags=texts)
        self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "KILLED")
