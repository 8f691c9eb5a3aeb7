"""What the driver records as each trial ends: ledger status, the job's cancellation, the parquet files, the console.

:class:`Bookkeeper` is called from the driver's loop (:mod:`ltssl.sweep.loop`), from a resumed
sweep's settling of what happened while no driver ran (:mod:`ltssl.sweep.resume`) and at the end.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ltssl.launch import JobHandle, LaunchError
from ltssl.launch.slurm_state import lost_job
from ltssl.results import ResultsWriter, read_jsonl
from ltssl.sweep.ledger import Ledger
from ltssl.sweep.spec import SweepSpec


def metric_history(run_dir: str | Path, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of every line of a trial's metrics.jsonl that carries ``metric``."""
    out = []
    for line in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        value, epoch = line.get(metric), line.get("epoch")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(epoch, int) and not line.get("final"):
            out.append((epoch, float(value)))
    return out


def final_metric(run_dir: str | Path, metric: str, status: str) -> float | None:
    """A completed trial's ``metric`` from result.json; else (or without it) its last evaluated value."""
    if status == "completed":
        try:
            value = json.loads((Path(run_dir) / "result.json").read_text()).get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        except (OSError, json.JSONDecodeError):
            pass
    history = metric_history(run_dir, metric)
    return history[-1][1] if history else None


def cancel_job(run_dir: str | Path) -> bool:
    """Cancel the job last submitted into ``run_dir`` if it has not ended; True when it had to."""
    try:
        handle = JobHandle.attach(run_dir)
        if handle.done():
            return False
        handle.cancel()
        return True
    except (LaunchError, OSError, ValueError):
        return False


#: results.parquet is rewritten at most once per this many seconds while the sweep runs (a burst of
#: trial ends costs one rewrite): the file lags a trial's end by at most about this much.
RESULTS_INTERVAL_S = 2.0
#: metrics.parquet (every line of every trial: it grows with the sweep) at most once per this many
#: seconds while the sweep runs; complete at the end.
METRICS_INTERVAL_S = 30.0


class Bookkeeper:
    """Ledger status, job cancellation, parquet files and the console, as trials end."""

    def __init__(self, spec: SweepSpec, output_dir: Path, sweep_id: str, board=None):
        self.spec = spec
        self.output_dir = output_dir
        self.ledger = Ledger(output_dir)
        self.writer = ResultsWriter(output_dir, sweep_id, metric=spec.metric, mode=spec.mode,
                                    results_interval_s=RESULTS_INTERVAL_S, metrics_interval_s=METRICS_INTERVAL_S)
        self.board = board
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cancel")
        self.cancels: list = []
        self._lock = threading.Lock()

    def write_results(self) -> tuple[Path, Path]:
        with self._lock:
            return self.writer.write(self.ledger.all())

    def flush(self) -> None:
        """Write the parquet rows still due (the driver's loop calls this at every look)."""
        with self._lock:
            self.writer.flush()

    def started(self, key: str) -> None:
        """Trial ``key`` is in flight (its job is being launched or followed)."""
        if self.board is not None:
            self.board.set_status(key, "running")

    def finish(self, key: str, status: str, error: str | None = None, cancel: bool = False) -> dict:
        """Record the end of trial ``key`` (a result status), cancel its job if asked; the record."""
        record = self.ledger.read(key)
        if status == "failed" and lost_job(record.get("error") or error):
            cancel = False  # its job may still run unseen: --resume re-attaches to it (resume.settle_unfinished)
        if cancel and record.get("run_dir"):
            # Off the driver's loop: a cancel can take a second or two.
            self.cancels.append(self.pool.submit(cancel_job, record["run_dir"]))
        fields: dict[str, Any] = {"status": status}
        if error is not None and not record.get("error"):
            fields["error"] = error
        if status == "completed":
            fields["error"] = None
        run_dir = record.get("run_dir") or ""
        fields["metric_value"] = final_metric(run_dir, self.spec.metric, status) if run_dir else None
        fields["metric_history"] = metric_history(run_dir, self.spec.metric) if run_dir else []
        record = self.ledger.update(key, **fields)
        with self._lock:  # this trial's rows only: the cost of a trial's end does not grow with the sweep
            self.writer.add(record)
        if self.board is not None:
            self._show(key, status, record)
        return record

    def _show(self, key: str, status: str, record: dict) -> None:
        """The board's status and best results, and one log line for the trial's end."""
        self.board.set_status(key, status)
        if status == "completed":
            self.board.offer(record["group"], key, record.get("metric_value"), record.get("params") or {})
        value = record.get("metric_value")
        shown = f" {self.spec.metric}={value:.4f}" if isinstance(value, float) else ""
        first_error = ""
        if status == "failed" and record.get("error"):
            lines = [ln for ln in str(record["error"]).splitlines() if ln.strip()]
            first_error = f": {lines[0]}" if lines else ""  # the error's one-line summary, whole
        self.board.log(f"{time.strftime('%H:%M:%S')} {key} {status}{shown} [{record['group']}]{first_error}")

    def wait_cancels(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for fut in self.cancels:
            try:
                fut.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                pass
        self.pool.shutdown(wait=False)
