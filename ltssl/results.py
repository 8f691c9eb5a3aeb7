"""A sweep's results: one row per trial in ``results.parquet``, every metrics line in ``metrics.parquet``.

Both files live in the sweep's output folder and are rewritten atomically (temp file + rename),
so they can be opened at any moment of a running sweep::

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

Cost per finished trial is flat (:meth:`ResultsWriter.add`): a trial's rows are built once, from
its own files, and kept as Arrow tables; results.parquet is re-encoded from those tables in C++
(no Python work per earlier trial), and both files are rewritten only when due: metrics.parquet,
which grows with every line of every trial, when the time since its last rewrite is at least
:data:`REWRITE_RATIO` times what that rewrite took; results.parquet at once, or (a sweep's
driver: ``results_interval_s``) at most once per that many seconds, and never sooner than
:data:`REWRITE_RATIO` times its last rewrite, so a burst of trial ends costs one rewrite, not one
per trial, and a sweep of tens of thousands of trials spends a bounded share of its driver's time
on the file (:meth:`ResultsWriter.flush`). :meth:`ResultsWriter.write`
rewrites both always.

Importing this module is cheap: pyarrow (about 100 MB of a process) is imported on first use of
a schema, a table or a file, because the sweep ledger and the trial actors import
:data:`RESULT_STATUSES` and :func:`parse_json_lines` from here and need nothing else.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ltssl.io import atomic_write_parquet

RESULTS_FILE = "results.parquet"
METRICS_FILE = "metrics.parquet"

#: Every status a results row can have (a trial that is over, or was interrupted).
RESULT_STATUSES = ("completed", "stopped_early", "failed", "cancelled")

#: Either file is rewritten by :meth:`ResultsWriter.flush` only when at least this many times its
#: last rewrite's duration has passed since: each file's share of the driver's time stays under 1 %,
#: whatever the sweep's size. A rewrite costs O(rows), so in a sweep of tens of thousands of trials
#: the files' lag grows instead of the driver's cost per trial (at 2,000 trials a results rewrite
#: takes about 5 ms, a metrics rewrite about 0.15 s: the 2-s and 30-s intervals still decide).
REWRITE_RATIO = 100.0

#: One row per finished trial (completed, stopped_early, failed or cancelled).
RESULTS_COLUMNS = (
    ("sweep_id", "string", "the sweep's id: its output folder's name"),
    ("trial_id", "string", "trial id within the sweep (t0000, t0001, ...); its run_dir is trials/<trial_id>"),
    ("status", "string", "completed, stopped_early (by the scheduler), failed, or cancelled (the sweep was interrupted)"),
    ("error", "string", "failed/cancelled: the error, with the job's remote traceback; else null"),
    ("group", "string", "the scheduler's comparison group, e.g. digits/r=10/lt/simsiam"),
    ("dataset", "string", "data.dataset"),
    ("imbalance_ratio", "float64", "data.imbalance_ratio: n_max / n_min of the training set"),
    ("n_train", "int64", "training images (result.json; null when the trial never finished)"),
    ("method", "string", "method.name: simsiam, simclr, moco_v2, supervised"),
    ("optimizer", "string", "optim.name: sgd, sam, rwsam"),
    ("rho", "float64", "optim.rho: SAM/rwSAM perturbation radius (null for sgd)"),
    ("adaptive", "bool", "optim.adaptive: ASAM scaling (null for sgd)"),
    ("weighting", "string", "optim.weighting: none, label_power, kde (null unless optimizer is rwsam)"),
    ("label_power_base", "float64", "optim.label_power_base (null unless weighting is label_power)"),
    ("kde_alpha", "float64", "optim.kde_alpha (null unless weighting is kde)"),
    ("kde_bandwidth", "float64", "optim.kde_bandwidth (null unless weighting is kde)"),
    ("balanced", "bool", "data.balanced: the balanced subset with the LT subset's n (for Delta(n, r))"),
    ("seed", "int64", "train.seed"),
    ("epochs_run", "int64", "epochs trained (for a trial that did not complete: the last evaluated epoch)"),
    ("knn_acc", "float64", "kNN accuracy on the balanced test set (last evaluation for a stopped trial)"),
    ("linear_acc", "float64", "linear-probe accuracy on the balanced test set"),
    ("acc_many", "float64", "linear-probe accuracy over the many-shot classes"),
    ("acc_medium", "float64", "linear-probe accuracy over the medium-shot classes"),
    ("acc_few", "float64", "linear-probe accuracy over the few-shot classes"),
    ("ood_linear_acc", "float64", "linear-probe accuracy on the out-of-domain dataset (null without one)"),
    ("per_class_acc", "list<float64>", "linear-probe accuracy per class, indexed by class id"),
    ("class_counts", "list<int64>", "training images per class, indexed by class id"),
    ("final_loss", "float64", "training loss at the end"),
    ("train_time_s", "float64", "training wall time in seconds (metrics span for unfinished trials)"),
    ("slurm_job_id", "string", "the last job's id (Slurm job id; local runs: the local controller's pid)"),
    ("partition", "string", "Slurm partition; null for local runs"),
    ("nodes", "int64", "launch.nodes"),
    ("gpus", "int64", "GPUs of the job: launch.nodes x launch.gpus_per_node"),
    ("node_list", "string", "nodes the job ran on"),
    ("git_commit", "string", "commit of the code that submitted the job"),
    ("params_json", "string", "JSON of this trial's sweep axes (dotted key -> value)"),
    ("config_json", "string", "JSON of the fully resolved training config"),
    ("run_dir", "string", "the trial's folder: config.yaml, metrics.jsonl, checkpoints/, result.json, job.json"),
)

#: Fixed columns of metrics.parquet; any other numeric key of a metrics line becomes a float64 column.
METRICS_COLUMNS = (
    ("sweep_id", "string", "the sweep's id"),
    ("trial_id", "string", "trial id (joins results.parquet)"),
    ("epoch", "int64", "1-based epoch the line belongs to"),
    ("step", "int64", "global optimizer step"),
    ("time", "float64", "unix time of the line in seconds"),
    ("final", "bool", "true on the trial's last line (which carries the result keys)"),
    ("loss", "float64", "training loss (step lines)"),
    ("lr", "float64", "learning rate (step lines)"),
    ("images_per_s", "float64", "training throughput (step lines)"),
    ("weight_mean", "float64", "mean rwSAM sample weight in the batch (step lines)"),
    ("weight_max", "float64", "largest rwSAM sample weight in the batch (step lines)"),
    ("knn_acc", "float64", "kNN accuracy (evaluation lines)"),
    ("linear_acc", "float64", "linear-probe accuracy (final line)"),
)


def _pa():
    """pyarrow, imported on first use (deferred: see the module docstring)."""
    import pyarrow  # pylint: disable=import-outside-toplevel

    return pyarrow


def _arrow_type(name: str):
    pa = _pa()
    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_(),
             "list<float64>": pa.list_(pa.float64()), "list<int64>": pa.list_(pa.int64())}
    return types[name]


def _field(name: str, type_name: str, description: str):
    return _pa().field(name, _arrow_type(type_name), nullable=True, metadata={"description": description})


@functools.lru_cache(maxsize=None)
def _schema(which: str):
    columns = RESULTS_COLUMNS if which == "results" else METRICS_COLUMNS
    return _pa().schema([_field(*column) for column in columns])


def __getattr__(name: str):
    """``RESULTS_SCHEMA`` and ``METRICS_SCHEMA``, built (with pyarrow) on first access."""
    if name == "RESULTS_SCHEMA":
        return _schema("results")
    if name == "METRICS_SCHEMA":
        return _schema("metrics")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_RESULT_KEYS = ("knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few", "ood_linear_acc", "final_loss", "train_time_s")


def describe_schema(schema=None) -> list[tuple[str, str, str]]:
    """(column, type, description) of every field of ``schema`` (default RESULTS_SCHEMA): the README's table."""
    schema = _schema("results") if schema is None else schema
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


def _config_fields(cfg: dict) -> dict[str, Any]:
    """The results columns taken from a trial's resolved config; settings the optimizer does not
    use are null, so that grouping by them cannot mislead (SGD has no rho and no adaptive scaling;
    only rwSAM weights its ascent loss)."""
    data, method, optim, launch = (cfg.get(k, {}) for k in ("data", "method", "optim", "launch"))
    row: dict[str, Any] = {
        "dataset": data.get("dataset"),
        "imbalance_ratio": _num(data.get("imbalance_ratio")),
        "method": method.get("name"),
        "optimizer": optim.get("name"),
        "rho": _num(optim.get("rho")),
        "adaptive": optim.get("adaptive"),
        "weighting": optim.get("weighting"),
        "label_power_base": _num(optim.get("label_power_base")),
        "kde_alpha": _num(optim.get("kde_alpha")),
        "kde_bandwidth": _num(optim.get("kde_bandwidth")),
        "balanced": data.get("balanced"),
        "seed": _int(cfg.get("train", {}).get("seed")),
        "partition": launch.get("partition"),
        "nodes": _int(launch.get("nodes")),
        "gpus": (_int(launch.get("nodes")) or 0) * (_int(launch.get("gpus_per_node")) or 0),
    }
    if row["optimizer"] == "sgd":
        row["rho"] = row["adaptive"] = None
    if row["optimizer"] != "rwsam":
        row["weighting"] = None
    if row["optimizer"] != "rwsam" or row["weighting"] != "label_power":
        row["label_power_base"] = None
    if row["optimizer"] != "rwsam" or row["weighting"] != "kde":
        row["kde_alpha"] = row["kde_bandwidth"] = None
    return row


def _outcome_fields(result: dict, metrics: list[dict]) -> dict[str, Any]:
    """The results columns taken from result.json, or for a trial that did not complete from its
    metrics lines (last evaluation, metrics time span)."""
    last_eval = next((m for m in reversed(metrics) if _num(m.get("knn_acc")) is not None), {})
    # An unfinished trial's epochs: the last evaluated one (later lines may be of an epoch cut short).
    epochs_seen = _int(last_eval.get("epoch")) if last_eval else (0 if metrics else None)
    times = [t for t in (_num(m.get("time")) for m in metrics) if t is not None]
    row: dict[str, Any] = {key: _num(result.get(key)) for key in _RESULT_KEYS}
    row["n_train"] = _int(result.get("n_train"))
    row["epochs_run"] = _int(result.get("epochs_run")) if result.get("epochs_run") is not None else epochs_seen
    row["per_class_acc"] = [float(x) for x in result["per_class_acc"]] if isinstance(result.get("per_class_acc"), list) else None
    row["class_counts"] = [int(x) for x in result["class_counts"]] if isinstance(result.get("class_counts"), list) else None
    if row["knn_acc"] is None:
        row["knn_acc"] = _num(last_eval.get("knn_acc"))
    if row["train_time_s"] is None and len(times) >= 2:
        row["train_time_s"] = max(times) - min(times)
    if row["n_train"] is None:
        row["n_train"] = _int(next((m.get("n_train") for m in reversed(metrics) if "n_train" in m), None))
    return row


def result_row(record: dict, sweep_id: str, metrics: list[dict] | None = None) -> dict:
    """The results row of one ledger record (see :class:`ltssl.sweep.ledger.Ledger`)."""
    cfg = record.get("config") or {}
    run_dir = Path(record.get("run_dir") or "")
    result = _read_json(run_dir / "result.json") if record.get("status") == "completed" else {}
    job = _read_json(run_dir / "job.json")
    if metrics is None:
        metrics = read_jsonl(run_dir / "metrics.jsonl")
    row: dict[str, Any] = {
        "sweep_id": sweep_id,
        "trial_id": record.get("trial_id"),
        "status": record.get("status"),
        "error": record.get("error"),
        "group": record.get("group"),
        **_config_fields(cfg),
        **_outcome_fields(result, metrics),
        "slurm_job_id": str(record.get("job_id") or job.get("job_id") or "") or None,
        "node_list": job.get("node_list"),
        "git_commit": job.get("git_commit"),
        "params_json": json.dumps(record.get("params") or {}, sort_keys=True, default=str),
        "config_json": json.dumps(cfg, sort_keys=True, default=str),
        "run_dir": str(run_dir) if record.get("run_dir") else None,
    }
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


def results_table(rows: list[dict], *, sweep_id: str = "", metric: str = "", mode: str = ""):
    """A ``pyarrow.Table`` of results rows, in :data:`RESULTS_SCHEMA`, with the sweep's metadata."""
    schema = _schema("results")
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    table = _pa().Table.from_pydict(columns, schema=schema)
    return table.replace_schema_metadata({"sweep_id": sweep_id, "metric": metric, "mode": mode})


def metrics_table(rows: list[dict], *, sweep_id: str = ""):
    """A ``pyarrow.Table`` of metrics rows: :data:`METRICS_SCHEMA`, then every other key as float64."""
    pa = _pa()
    fixed = [f.name for f in _schema("metrics")]
    extra = sorted({k for row in rows for k in row} - set(fixed))
    schema = pa.schema(list(_schema("metrics")) + [_field(k, "float64", "a numeric field of the metrics line") for k in extra])
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata({"sweep_id": sweep_id})


def _concat_metrics(tables: list, sweep_id: str):
    """One metrics table from per-trial tables whose extra columns differ (missing ones null);
    fixed columns first, then the extra ones sorted, as :func:`metrics_table` orders them."""
    pa = _pa()
    if not tables:
        return metrics_table([], sweep_id=sweep_id)
    merged = pa.concat_tables(tables, promote_options="default")
    fixed = [f.name for f in _schema("metrics")]
    order = fixed + sorted(set(merged.column_names) - set(fixed))
    return merged.select(order).replace_schema_metadata({"sweep_id": sweep_id})


def write_parquet_atomic(table, path: str | os.PathLike) -> Path:
    """Write ``table`` so a reader sees the old file or the whole new one, never a partial file."""
    return atomic_write_parquet(path, table)


class ResultsWriter:
    """Writes results.parquet and metrics.parquet of a sweep folder from its ledger records.

    Each trial's rows are built from its files once and kept as Arrow tables: a trial is parsed
    again only when its ledger record or its metrics file changed, so the cost of one more
    finished trial does not grow with the trials before it (see the module docstring).

    * :meth:`add` (a trial has just ended): that trial's rows, then :meth:`flush`;
    * :meth:`flush`: each file rewritten if its rows changed and its rewrite is due (at least
      ``results_interval_s`` / ``metrics_interval_s`` and :data:`REWRITE_RATIO` times its last
      rewrite's duration after that rewrite); call it again later (a sweep's loop does, every
      look) so the last changes reach the files;
    * :meth:`write` (sweep start and end, a resume): every record, both files rewritten.
    """

    def __init__(self, output_dir: str | os.PathLike, sweep_id: str, metric: str = "", mode: str = "",
                 results_interval_s: float = 0.0, metrics_interval_s: float = 0.0):
        self.output_dir = Path(output_dir)
        self.sweep_id = sweep_id
        self.metric = metric
        self.mode = mode
        self._rows: dict[str, tuple[tuple, Any]] = {}      # trial_id -> (record key, 1-row results table)
        self._metrics: dict[str, tuple[tuple, Any]] = {}   # trial_id -> (metrics.jsonl stat, metrics table)
        self._results_table = None                          # combined results, rebuilt when a row changes
        self.results_interval_s = results_interval_s
        self.metrics_interval_s = metrics_interval_s
        self._results_dirty = False                          # rows changed since results.parquet was written
        self._metrics_dirty = False                          # the same for metrics.parquet
        self._results_due = 0.0                              # monotonic time from which a results rewrite is due
        self._metrics_due = 0.0                             # monotonic time from which a metrics rewrite is due

    def _trial_metrics(self, record: dict) -> tuple[list[dict] | None, Any]:
        """(parsed lines, or None when unchanged since the last call; the trial's metrics table)."""
        trial_id = record["trial_id"]
        path = Path(record.get("run_dir") or "") / "metrics.jsonl"
        try:
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            key = None
        cached = self._metrics.get(trial_id)
        if cached is not None and cached[0] == key:
            return None, cached[1]
        lines = read_jsonl(path) if key is not None and record.get("run_dir") else []
        table = metrics_table(metrics_rows(lines, self.sweep_id, trial_id), sweep_id=self.sweep_id)
        self._metrics[trial_id] = (key, table)
        return lines, table

    def _update(self, record: dict) -> None:
        """Refresh one trial's cached tables from its record and files (no-op when unchanged)."""
        trial_id = record["trial_id"]
        lines, _ = self._trial_metrics(record)
        if record.get("status") not in RESULT_STATUSES:
            if self._rows.pop(trial_id, None) is not None:
                self._results_table = None
        
            return
        key = (record.get("status"), record.get("updated"), record.get("error"))
        cached = self._rows.get(trial_id)
        if cached is not None and cached[0] == key and lines is None:
            return
        row = result_row(record, self.sweep_id, lines)
        table = results_table([row], sweep_id=self.sweep_id, metric=self.metric, mode=self.mode)
        if cached is None and self._results_table is not None:
            self._results_table = _pa().concat_tables([self._results_table, table])  # the usual case: one more row
        else:
            self._results_table = None
        self._rows[trial_id] = (key, table)

    def _results(self):
        """Every results row, ordered by trial id (rows are appended in the order trials end)."""
        if self._results_table is None:
            tables = [table for _, table in self._rows.values()]
            self._results_table = (_pa().concat_tables(tables) if tables
                                   else results_table([], sweep_id=self.sweep_id, metric=self.metric, mode=self.mode))
        if self._results_table.column(0).num_chunks > 64:  # keep the column chunks few: encoding stays fast
            self._results_table = self._results_table.combine_chunks()
        return self._results_table.sort_by("trial_id")

    def _write_metrics(self) -> Path:
        started = time.monotonic()
        tables = [self._metrics[k][1] for k in sorted(self._metrics)]
        path = write_parquet_atomic(_concat_metrics(tables, self.sweep_id), self.output_dir / METRICS_FILE)
        took = time.monotonic() - started
        self._metrics_due = time.monotonic() + max(REWRITE_RATIO * took, self.metrics_interval_s)
        self._metrics_dirty = False
        return path

    def add(self, record: dict) -> tuple[Path, Path]:
        """One trial's record after it ended (or changed): its rows, then :meth:`flush`."""
        self._update(record)
        self._results_dirty = self._metrics_dirty = True
        return self.flush()

    def flush(self) -> tuple[Path, Path]:
        """Rewrite what is due (see the class); the two files' paths."""
        results = self.output_dir / RESULTS_FILE
        if self._results_dirty and time.monotonic() >= self._results_due:
            results = self._write_results()
        metrics = self.output_dir / METRICS_FILE
        if self._metrics_dirty and (time.monotonic() >= self._metrics_due or not metrics.is_file()):
            metrics = self._write_metrics()
        return results, metrics

    def _write_results(self) -> Path:
        started = time.monotonic()
        path = write_parquet_atomic(self._results(), self.output_dir / RESULTS_FILE)
        took = time.monotonic() - started
        self._results_dirty = False
        if self.results_interval_s > 0:  # a sweep's writer; without an interval, every add writes at once
            self._results_due = time.monotonic() + max(REWRITE_RATIO * took, self.results_interval_s)
        return path

    def write(self, records: list[dict]) -> tuple[Path, Path]:
        """Both files from every ledger record; results rows only for trials that are over, metrics
        lines of every trial (the running ones too: learning curves of a live sweep)."""
        seen = {record["trial_id"] for record in records}
        for trial_id in [k for k in self._rows if k not in seen]:
            del self._rows[trial_id]
            self._results_table = None

        for trial_id in [k for k in self._metrics if k not in seen]:
            del self._metrics[trial_id]
        for record in records:
            self._update(record)
        return self._write_results(), self._write_metrics()


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


def read_table(path: str | os.PathLike):
    """Read a parquet file through one open file handle (a ``pyarrow.Table``).

    ``pq.read_table(path)`` (and ``pd.read_parquet(path)``) open the path twice, footer first
    and pages later; a rewrite that lands between the two opens makes that one read fail.
    Reading through one handle sees either the old file or the new one, whole.
    """
    import pyarrow.parquet as pq  # deferred with pyarrow itself (module docstring)

    with open(path, "rb") as fh:
        return pq.ParquetFile(fh).read()
