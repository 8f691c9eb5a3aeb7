"""What one driver run of a sweep works with (:class:`SweepRun`) and what it leaves (:class:`SweepOutcome`).

Both are plain data, importable without Ray: :mod:`ltssl.sweep.folder` fills a :class:`SweepRun`
from a new or a resumed sweep folder, :func:`ltssl.sweep.driver.run_sweep` completes it (trials,
console, dashboard) and :mod:`ltssl.sweep.run` runs Tune with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltssl.sweep.spec import SweepSpec, TrialPlan


@dataclass
class SweepRun:
    """One driver run of a sweep: decided before Ray starts, read by everything after."""

    spec: SweepSpec
    output_dir: Path                  # the sweep folder (absolute once Ray starts)
    sweep_id: str                     # the folder's name
    partition: str | None             # Slurm partition; None: local jobs
    target: str                       # "module:function" every job runs
    target_kwargs: dict | None        # its extra keyword arguments
    resume: bool = False              # continue the sweep already in output_dir
    trials: list[TrialPlan] = field(default_factory=list)
    console: Any = None               # rich Console of the driver
    live: bool | None = None          # redraw the board in place (None: when the console is a terminal)
    analyze: bool = True              # write the report at the end
    dashboard_port: int | None = None  # None: no dashboard


@dataclass
class SweepOutcome:
    """What a sweep run leaves: its folder, files and trial counts."""

    output_dir: Path
    sweep_id: str
    counts: dict = field(default_factory=dict)
    results_path: Path | None = None
    metrics_path: Path | None = None
    report_dir: Path | None = None
    interrupted: str | None = None      # None, "cancelled" (Ctrl-C), "detached" (SIGTERM) or "ray_lost"
    dashboard_url: str | None = None
