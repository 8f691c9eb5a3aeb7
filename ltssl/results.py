"""A sweep's results: one row per trial in ``results.parquet``, every metrics line in ``metrics.parquet``.

Both files live in the sweep's output folder and are rewritten atomically (temp file + rename)
each time a trial finishes, so they can be opened at any moment of a running sweep::

    import pandas as pd
    df = pd.read_parquet("results/digits_lt-default-20261124-101500/results.parquet")

(pyarrow opens a path twice, footer then pages: a read that straddles a rewrite fails and can be
retried. A loop that polls a live sweep should read through one handle,
``pd.read_parquet(open(path, "rb"))``, or :func:`read_results`, which never fail that way.)

Column names and types are :data:`RESULTS_SCHEMA` and :data:`METRICS_SCHEMA` (pyarrow schemas;
each field's ``description`` metadata is the README's table). Rows are built from the files a
trial leaves behind (the sweep ledger, ``run_dir/result.json``, ``run_dir/metrics.jsonl``,
``run_dir/job.json``), never from Ray Tune's own records, so a resumed sweep writes the same
rows. Accuracies are fractions in [0, 1]. The parquet key-value metadata holds ``sweep_id``,
``metric`` and ``mode`` of the sweep (the analysis reads them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ltssl.io import atomic_write_parquet

RESULTS_FILE = "results.parquet"
METRICS_FILE = "metrics.parquet"

#: Every status a results row can have (a trial that is over, or was interrupted).
RESULT_STATUSES = ("completed", "stopped_early", "failed", "cancelled")


def _field(name: str, type_: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, type_, nullable=True, metadata={"description": description})


#: One row per finished trial (completed, stopped_early, failed or cancelled).
RESULTS_SCHEMA = pa.schema(
    [
        _field("sweep_id", pa.string(), "the sweep's id: its output folder's name"),
        _field("trial_id", pa.string(), "trial id within the sweep (t0000, t0001, ...); its run_dir is trials/<trial_id>"),
        _field("status", pa.string(), "completed, stopped_early (by the scheduler), failed, or cancelled (the sweep was interrupted)"),
        _field("error", pa.string(), "failed/cancelled: the error, with the job's remote traceback; else null"),
        _field("group", pa.string(), "the scheduler's comparison group, e.g. digits/r=10/lt/simsiam"),
        _field("dataset", pa.string(), "data.dataset"),
        _field("imbalance_ratio", pa.float64(), "data.imbalance_ratio: n_max / n_min of the training set"),
        _field("n_train", pa.int64(), "training images (result.json; null when the trial never finished)"),
        _field("method", pa.string(), "method.name: simsiam, simclr, moco_v2, supervised"),
        _field("optimizer", pa.string(), "optim.name: sgd, sam, rwsam"),
        _field("rho", pa.float64(), "optim.rho: SAM/rwSAM perturbation radius (null for sgd)"),
        _field("adaptive", pa.bool_(), "optim.adaptive: ASAM scaling (null for sgd)"),
        _field("weighting", pa.string(), "optim.weighting: none, label_power, kde (null unless optimizer is rwsam)"),
        _field("label_power_base", pa.float64(), "optim.label_power_base (null unless weighting is label_power)"),
        _field("kde_alpha", pa.float64(), "optim.kde_alpha (null unless weighting is kde)"),
        _field("kde_bandwidth", pa.float64(), "optim.kde_bandwidth (null unless weighting is kde)"),
        _field("balanced", pa.bool_(), "data.balanced: the balanced subset with the LT subset's n (for Delta(n, r))"),
        _field("seed", pa.int64(), "train.seed"),
        _field("epochs_run", pa.int64(), "epochs trained (for a trial that did not complete: the last evaluated epoch)"),
        _field("knn_acc", pa.float64(), "kNN accuracy on the balanced test set (last evaluation for a stopped trial)"),
        _field("linear_acc", pa.float64(), "linear-probe accuracy on the balanced test set"),
        _field("acc_many", pa.float64(), "linear-probe accuracy over the many-shot classes"),
        _field("acc_medium", pa.float64(), "linear-probe accuracy over the medium-shot classes"),
        _field("acc_few", pa.float64(), "linear-probe accuracy over the few-shot classes"),
        _field("ood_linear_acc", pa.float64(), "linear-probe accuracy on the out-of-domain dataset (null without one)"),
        _field("per_class_acc", pa.list_(pa.float64()), "linear-probe accuracy per class, indexed by class id"),
        _field("class_counts", pa.list_(pa.int64()), "training images per class, indexed by class id"),
        _field("final_loss", pa.float64(), "training loss at the end"),
        _field("train_time_s", pa.float64(), "training wall time in seconds (metrics span for unfinished trials)"),
        _field("slurm_job_id", pa.string(), "the last job's id (Slurm job id; local runs: the local controller's pid)"),
        _field("partition", pa.string(), "Slurm partition; null for local runs"),
        _field("nodes", pa.int64(), "launch.nodes"),
        _field("gpus", pa.int64(), "GPUs of the job: launch.nodes x launch.gpus_per_node"),
        _field("node_list", pa.string(), "nodes the job ran on"),
        _field("git_commit", pa.string(), "commit of the code that submitted the job"),
        _field("params_json", pa.string(), "JSON of this trial's sweep axes (dotted key -> value)"),
        _field("config_json", pa.string(), "JSON of the fully resolved training config"),
        _field("run_dir", pa.string(), "the trial's folder: config.yaml, metrics.jsonl, checkpoints/, result.json, job.json"),
    ]
)

#: Fixed columns of metrics.parquet; any other numeric key of a metrics line becomes a float64 column.
METRICS_SCHEMA = pa.schema(
    [
        _field("sweep_id", pa.string(), "the sweep's id"),
        _field("trial_id", pa.string(), "trial id (joins results.parquet)"),
        _field("epoch", pa.int64(), "1-based epoch the line belongs to"),
        _field("step", pa.int64(), "global optimizer step"),
        _field("time", pa.float64(), "unix time of the line in seconds"),
        _field("final", pa.bool_(), "true on the trial's last line (which carries the result keys)"),
        _field("loss", pa.float64(), "training loss (step lines)"),
        _field("lr", pa.float64(), "learning rate (step lines)"),
        _field("images_per_s", pa.float64(), "training throughput (step lines)"),
        _field("weight_mean", pa.float64(), "mean rwSAM sample weight in the batch (step lines)"),
        _field("weight_max", pa.float64(), "largest rwSAM sample weight in the batch (step lines)"),
        _field("knn_acc", pa.float64(), "kNN accuracy (evaluation lines)"),
        _field("linear_acc", pa.float64(), "linear-probe accuracy (final line)"),
    ]
)

_RESULT_KEYS = ("knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few", "ood_linear_acc", "final_loss", "train_time_s")


def describe_schema(schema: pa.Schema = RESULTS_SCHEMA) -> list[tuple[str, str, str]]:
    """(column, type, description) of every field: the README's table."""
    return [(f.name, str(f.type), (f.metadata or {}).get(b"description", b"").decode()) for f in schema]


# --------------------------------------------------------------------------- reading trial files


def parse_json_lines(raw_lines) -> list[dict]:
    """The JSON objects among ``raw_lines`` (str or bytes, complete lines); blank or broken lines are passed over."""
    lines = []
    for raw in raw_lines:
        raw = raw.strip()
        if not raw:
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete JSON line of ``path`` (a line still being written is left out)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return parse_json_lines(text.split("\n")[:-1])  # the last piece is "" or a partial line


def final_trajectory(lines: list[dict]) -> list[dict]:
    """The metrics lines of the run that produced the result.

    A job resumed from its checkpoint at step S logs ``{"resumed": true, "step": S}`` and then
    re-runs (identically) the steps its previous attempt had logged after S: those earlier lines
    are dropped, so each step appears once and learning curves do not fold back.
    """
    kept: list[dict] = []
    for line in lines:
        if line.get("resumed") and isinstance(line.get("step"), int):
            resumed_at = line["step"]
            kept = [k for k in kept if not (isinstance(k.get("step"), int) and k["step"] > resumed_at)]
        kept.append(line)
    return kept


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    v = _num(value)
    return None if v is None else int(v)


def result_row(record: dict, sweep_id: str, metrics: list[dict] | None = None) -> dict:
    """The results row of one ledger record (see :class:`ltssl.sweep.ledger.Ledger`)."""
    cfg = record.get("config") or {}
    data, method, optim, launch = (cfg.get(k, {}) for k in ("data", "method", "optim", "launch"))
    train = cfg.get("train", {})
    run_dir = Path(record.get("run_dir") or "")
    result = _read_json(run_dir / "result.json") if record.get("status") == "completed" else {}
    job = _read_json(run_dir / "job.json")
    if metrics is None:
        metrics = read_jsonl(run_dir / "metrics.jsonl")
    last_eval = next((m for m in reversed(metrics) if _num(m.get("knn_acc")) is not None), {})
    # An unfinished trial's epochs: the last evaluated one (later lines may be of an epoch cut short).
    epochs_seen = _int(last_eval.get("epoch")) if last_eval else (0 if metrics else None)
    times = [t for t in (_num(m.get("time")) for m in metrics) if t is not None]

    row: dict[str, Any] = {
        "sweep_id": sweep_id,
        "trial_id": record.get("trial_id"),
        "status": record.get("status"),
        "error": record.get("error"),
        "group": record.get("group"),
        "dataset": data.get("dataset"),
        "imbalance_ratio": _num(data.get("imbalance_ratio")),
        "n_train": _int(result.get("n_train")),
        "method": method.get("name"),
        "optimizer": optim.get("name"),
        "rho": _num(optim.get("rho")),
        "adaptive": optim.get("adaptive"),
        "weighting": optim.get("weighting"),
        "label_power_base": _num(optim.get("label_power_base")),
        "kde_alpha": _num(optim.get("kde_alpha")),
        "kde_bandwidth": _num(optim.get("kde_bandwidth")),
        "balanced": data.get("balanced"),
        "seed": _int(train.get("seed")),
        "epochs_run": _int(result.get("epochs_run")) if result.get("epochs_run") is not None else epochs_seen,
        "per_class_acc": [float(x) for x in result["per_class_acc"]] if isinstance(result.get("per_class_acc"), list) else None,
        "class_counts": [int(x) for x in result["class_counts"]] if isinstance(result.get("class_counts"), list) else None,
        "slurm_job_id": str(record.get("job_id") or job.get("job_id") or "") or None,
        "partition": launch.get("partition"),
        "nodes": _int(launch.get("nodes")),
        "gpus": (_int(launch.get("nodes")) or 0) * (_int(launch.get("gpus_per_node")) or 0),
        "node_list": job.get("node_list"),
        "git_commit": job.get("git_commit"),
        "params_json": json.dumps(record.get("params") or {}, sort_keys=True, default=str),
        "config_json": json.dumps(cfg, sort_keys=True, default=str),
        "run_dir": str(run_dir) if record.get("run_dir") else None,
    }
    # Settings the optimizer does not use are null, so that grouping by them cannot mislead:
    # SGD has no rho and no adaptive scaling; only rwSAM weights its ascent loss.
    if row["optimizer"] == "sgd":
        row["rho"] = row["adaptive"] = None
    if row["optimizer"] != "rwsam":
        row["weighting"] = None
    if row["optimizer"] != "rwsam" or row["weighting"] != "label_power":
        row["label_power_base"] = None
    if row["optimizer"] != "rwsam" or row["weighting"] != "kde":
        row["kde_alpha"] = row["kde_bandwidth"] = None
    for key in _RESULT_KEYS:
        row[key] = _num(result.get(key))
    if row["knn_acc"] is None:
        row["knn_acc"] = _num(last_eval.get("knn_acc"))
    if row["train_time_s"] is None and len(times) >= 2:
        row["train_time_s"] = max(times) - min(times)
    if row["n_train"] is None:
        row["n_train"] = _int(next((m.get("n_train") for m in reversed(metrics) if "n_train" in m), None))
    return row


def metrics_rows(lines: list[dict], sweep_id: str, trial_id: str) -> list[dict]:
    """metrics.parquet rows of one trial: every scalar field of every line (lists/strings dropped),
    lines a resumed attempt re-ran left out (:func:`final_trajectory`)."""
    rows = []
    for line in final_trajectory(lines):
        row: dict[str, Any] = {"sweep_id": sweep_id, "trial_id": trial_id, "final": bool(line.get("final", False))}
        for key, value in line.items():
            if key in ("final", "sweep_id", "trial_id"):
                continue
            if key in ("epoch", "step"):
                row[key] = _int(value)
            elif isinstance(value, bool):
                row[key] = float(value)
            elif isinstance(value, (int, float)):
                row[key] = _num(value)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- tables and files


def results_table(rows: list[dict], *, sweep_id: str = "", metric: str = "", mode: str = "") -> pa.Table:
    columns = {f.name: [row.get(f.name) for row in rows] for f in RESULTS_SCHEMA}
    table = pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA)
    return table.replace_schema_metadata({"sweep_id": sweep_id, "metric": metric, "mode": mode})


def metrics_table(rows: list[dict], *, sweep_id: str = "") -> pa.Table:
    fixed = [f.name for f in METRICS_SCHEMA]
    extra = sorted({k for row in rows for k in row} - set(fixed))
    schema = pa.schema(list(METRICS_SCHEMA) + [_field(k, pa.float64(), "a numeric field of the metrics line") for k in extra])
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata({"sweep_id": sweep_id})


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` so a reader sees the old file or the whole new one, never a partial file."""
    return atomic_write_parquet(path, table)


class ResultsWriter:
    """Rebuilds results.parquet and metrics.parquet of a sweep folder from its ledger and trial files.

    Metrics of trials that are over are parsed once and cached: a long sweep does not re-read
    every metrics.jsonl at each trial's end.
    """

    def __init__(self, output_dir: str | os.PathLike, sweep_id: str, metric: str = "", mode: str = ""):
        self.output_dir = Path(output_dir)
        self.sweep_id = sweep_id
        self.metric = metric
        self.mode = mode
        self._cache: dict[str, tuple[tuple, list[dict]]] = {}

    def _metrics(self, record: dict) -> list[dict]:
        run_dir = record.get("run_dir")
        if not run_dir:
            return []
        path = Path(run_dir) / "metrics.jsonl"
        try:
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            return []
        cached = self._cache.get(record["trial_id"])
        if cached is not None and cached[0] == key:
            return cached[1]
        lines = read_jsonl(path)
        self._cache[record["trial_id"]] = (key, lines)
        return lines

    def write(self, records: list[dict]) -> tuple[Path, Path]:
        """Write both files from the ledger ``records``; rows only for trials that are over."""

        rows, mrows = [], []
        for record in records:
            lines = self._metrics(record)
            mrows.extend(metrics_rows(lines, self.sweep_id, record["trial_id"]))
            if record.get("status") in RESULT_STATUSES:
                rows.append(result_row(record, self.sweep_id, lines))
        results = write_parquet_atomic(
            results_table(rows, sweep_id=self.sweep_id, metric=self.metric, mode=self.mode), self.output_dir / RESULTS_FILE
        )
        metrics = write_parquet_atomic(metrics_table(mrows, sweep_id=self.sweep_id), self.output_dir / METRICS_FILE)
        return results, metrics


def read_results(output_dir: str | os.PathLike):
    """(results DataFrame, metrics DataFrame or None, metadata dict) of a sweep folder."""
    output_dir = Path(output_dir)
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no trial of this sweep has finished yet")
    table = read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    results = table.to_pandas()
    mpath = output_dir / METRICS_FILE
    metrics = read_table(mpath).to_pandas() if mpath.is_file() else None
    return results, metrics, meta


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a parquet file through one open file handle.

    ``pq.read_table(path)`` (and ``pd.read_parquet(path)``) open the path twice, footer first
    and pages later; a rewrite that lands between the two opens makes that one read fail.
    Reading through one handle sees either the old file or the new one, whole.
    """
    with open(path, "rb") as fh:
        return pq.ParquetFile(fh).read()
