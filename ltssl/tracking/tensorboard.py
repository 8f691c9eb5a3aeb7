"""TensorBoard: event files in the run folder, so ``tensorboard --logdir <sweep folder>`` shows one run
per trial (named ``trials/<trial_id>``), the HParams view included.

Scalars: every numeric field of every metrics line at its ``step`` (wall time = the line's ``time``).
HParams: the resolved config (dotted keys) as the session's hyperparameters, written when the job
starts (so a running trial shows up), and a session end when it completes; the HParams view's
metrics are the run's scalars, whose last values are the final metrics.

Requeues: a resumed job's first line is ``{"resumed": true, "step": S}`` and it re-runs the steps
after S. Before writing, the earlier attempts' event files are rewritten without those steps (and
without their HParams session, written again), so each step is in the files once; a TensorBoard
already running drops its copies of those steps when the re-run writes them (it evicts the points
at and after a step that comes again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from ltssl.tracking.common import RunIdentity, StepFilter, Tracker, flat_config, scalars

HPARAMS_TAG_PREFIX = "_hparams_/"


def _stale(event: Any, first_dropped: int) -> bool:
    """An event of an earlier attempt that this attempt writes again."""
    if not event.HasField("summary"):
        return False
    if any(v.tag.startswith(HPARAMS_TAG_PREFIX) for v in event.summary.value):
        return True
    return event.step >= first_dropped


def drop_steps(folder: Path, first_dropped: int) -> dict[str, int]:
    """Rewrite the event files in ``folder`` without scalars at steps >= ``first_dropped`` and
    without HParams sessions; atomically per file. Returns the last step kept of each tag."""
    last: dict[str, int] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = list(EventFileLoader(str(path)).Load())
        keep = [e for e in events if not _stale(e, first_dropped)]
        for event in keep:
            for value in event.summary.value:
                last[value.tag] = max(last.get(value.tag, -1), event.step)
        if len(keep) == len(events):
            continue
        tmp = path.with_name(f".rewrite-{os.getpid()}")  # no "tfevents" in the name: TensorBoard ignores it
        with open(tmp, "wb") as fh:
            writer = RecordWriter(fh)
            for event in keep:
                writer.write(event.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return last


def _hparam_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


class TensorBoardTracker(Tracker):
    """One TensorBoard run per trial, in the run folder (opened at the first metrics line)."""

    def __init__(self, cfg: Any, ident: RunIdentity):
        self.folder = ident.run_dir
        self.hparams = {k: _hparam_value(v) for k, v in flat_config(cfg).items()}
        self.writer: SummaryWriter | None = None
        self.steps = StepFilter()

    def _open(self, first_step: int) -> None:
        # a step the earlier attempt logged at the checkpoint (e.g. a line at the epoch's start) is not logged twice
        self.steps = StepFilter(drop_steps(self.folder, first_step))
        self.writer = SummaryWriter(log_dir=str(self.folder))
        _, session_start, _ = hparams(self.hparams, {})
        self.writer.file_writer.add_summary(session_start)

    def log(self, line: dict[str, Any]) -> None:
        step = line.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        if self.writer is None:
            self._open(step + 1 if line.get("resumed") else step)
        walltime = line.get("time") if isinstance(line.get("time"), (int, float)) else None
        for key, value in self.steps.fresh(scalars(line), step).items():
            self.writer.add_scalar(key, value, step, walltime=walltime)
        self.writer.flush()  # a TensorBoard watching the sweep sees each line as it comes

    def close(self, result: dict[str, Any] | None) -> None:
        if self.writer is None:
            return
        if result is not None:
            _, _, session_end = hparams(self.hparams, {})
            self.writer.file_writer.add_summary(session_end)
        self.writer.close()
        self.writer = None
