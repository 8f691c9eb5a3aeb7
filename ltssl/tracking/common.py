"""What every tracker shares: the interface, which run a job is, and the values it reports."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltssl.config import to_dict
from ltssl.results import result_row

#: Fields of a metrics line that are not curves: the x axis, the wall clock, and markers.
NOT_SCALARS = ("step", "time", "final", "resumed")


class Tracker:
    """No tracker: the interface every tracker implements."""

    def log(self, line: dict[str, Any]) -> None:
        """One metrics line, as written to ``metrics.jsonl`` (``step``: the global step, an int).

        A resumed job's first line is ``{"resumed": true, "step": S, ...}``: it re-runs the steps
        after S, so a tracker replaces (or skips) what an earlier attempt logged after S.
        """

    def close(self, result: dict[str, Any] | None) -> None:
        """The end of this job (``result``: the final result dict, or None if the job stops early)."""


@dataclass(frozen=True)
class RunIdentity:
    """Where a job's run belongs: a trial of a sweep (``<sweep>/trials/<trial_id>``) or a lone run."""

    run_dir: Path
    trial_id: str
    sweep_id: str | None = None
    sweep_dir: Path | None = None

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunIdentity":
        """The sweep folder layout of ``ltssl.results``: sweep id = the sweep folder's name."""
        run_dir = Path(run_dir).resolve()
        if run_dir.parent.name == "trials":
            sweep_dir = run_dir.parent.parent
            return cls(run_dir, run_dir.name, sweep_dir.name, sweep_dir)
        return cls(run_dir, run_dir.name)

    @property
    def run_id(self) -> str:
        """``<sweep id>-<trial id>`` in a sweep, else the run folder's name; W&B's reserved
        characters (``:;,#?/'``) and whitespace become ``_``."""
        name = f"{self.sweep_id}-{self.trial_id}" if self.sweep_id else self.trial_id
        return re.sub(r"[:;,#?/'\s]", "_", name)


def wandb_mode(cfg: Any) -> str:
    """``tracking.wandb_mode``, else ``WANDB_MODE``, else online."""
    return cfg.tracking.wandb_mode or os.environ.get("WANDB_MODE") or "online"


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """Every numeric field of a metrics line but the step, the time and the markers (bools as 0/1);
    none of a ``resumed`` line (its epoch was logged by the attempt that wrote the checkpoint)."""
    out: dict[str, float] = {}
    if line.get("resumed"):
        return out
    for key, value in line.items():
        if key in NOT_SCALARS or isinstance(value, (str, list, dict)) or value is None:
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


class StepFilter:
    """Each (key, step) once: an epoch's last step line and its evaluation line share a step and
    both carry ``epoch``; a re-run step of a resumed job comes again."""

    def __init__(self, last: dict[str, int] | None = None):
        self.last = dict(last or {})

    def fresh(self, values: dict[str, float], step: int) -> dict[str, float]:
        """The entries of ``values`` not yet logged at ``step`` or later; remembers them."""
        out = {k: v for k, v in values.items() if step > self.last.get(k, -1)}
        self.last.update((k, step) for k in out)
        return out


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as ``{"optim.rho": 0.5, ...}``; lists become JSON text, None stays None."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, name)
            else:
                flat[name] = json.dumps(value) if isinstance(value, list) else value

    walk(to_dict(cfg), "")
    return flat


def summary_row(ident: RunIdentity, cfg: Any, result: dict[str, Any] | None) -> dict[str, Any]:
    """The trial's results row (``ltssl.results.result_row``), from the sweep's ledger record
    when there is one (group, params, job ids), as it stands when this job ends."""
    record: dict[str, Any] = {}
    if ident.sweep_dir is not None:
        try:
            record = json.loads((ident.sweep_dir / "ledger" / f"{ident.trial_id}.json").read_text())
        except (OSError, ValueError):
            record = {}
    record = {"trial_id": ident.trial_id, "config": to_dict(cfg), **record, "run_dir": str(ident.run_dir)}
    if result is not None:
        record["status"] = "completed"
    row = result_row(record, ident.sweep_id or "")
    if result is not None and not (ident.run_dir / "result.json").exists():
        row.update({k: v for k, v in result.items() if k in row and row[k] is None})
    return row


def numeric_items(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a results row (bools left out: they are settings, not metrics)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
