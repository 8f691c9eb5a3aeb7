"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) fed from a training job's metrics lines.

The training loop calls :func:`open_tracker` once on rank 0, ``tracker.log(line)`` for every line it
writes to ``metrics.jsonl`` and ``tracker.close(result)`` at the end (``result`` is the job's
result dict, or None when the job stops early). A tracker never fails a job: errors are logged once
and the tracker goes quiet. ``metrics.jsonl`` and the results parquet stay the source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tracker:
    """No tracker: the interface every tracker implements."""

    def log(self, line: dict[str, Any]) -> None:
        """One metrics line (the dict written to ``metrics.jsonl``; ``step`` is the global step)."""

    def close(self, result: dict[str, Any] | None) -> None:
        """The end of this job (``result``: the final result dict, or None if the job stops early)."""


def open_tracker(cfg: Any, run_dir: str | Path) -> Tracker:
    """The trackers ``cfg`` asks for, as one :class:`Tracker` (call on rank 0 only)."""
    return Tracker()
