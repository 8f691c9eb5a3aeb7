"""The driver's Tune callback: every trial's start and end go to the ledger, the parquet files and the console.

The callback, not the trial actor, cancels a stopped trial's job: Ray may kill an actor's
subprocesses (the ``scancel``) together with the actor, while the driver's callback always runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ray.tune import Callback

from ltssl.sweep.bookkeeping import Bookkeeper


def _inert_callback() -> Callback:
    return Callback()


class SweepCallback(Callback):
    """Records every trial's end (status, error, metric) and keeps the console current."""

    def __init__(self, book: Bookkeeper, scheduler=None, ray_lost: Callable[[], str | None] = lambda: None):
        self.book = book
        self.scheduler = scheduler    # GroupedASHA or None: which trials it stopped
        # With the driver's Ray gone every running trial ends at once ("owner's node has crashed"),
        # while its job runs on: nothing is recorded (and no job cancelled) then; --resume re-attaches.
        self.ray_lost = ray_lost

    def __reduce__(self):
        # Tune pickles its callbacks into the experiment folder for Tuner.restore, which this
        # sweep does not use (the ledger is its record): nothing to save.
        return (_inert_callback, ())

    def on_trial_start(self, iteration, trials, trial, **info):
        key = trial.config["trial_key"]
        self.book.ledger.mark(key, "started")  # Tune gave it a slot and an actor
        if self.book.board is not None:
            self.book.board.set_status(key, "running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.ray_lost():
            return
        key = trial.config["trial_key"]
        stopped = self.scheduler is not None and key in self.scheduler.stopped
        result = trial.last_result or {}
        if stopped:
            self.book.finish(key, "stopped_early", cancel=True)
        elif result.get("done") and result.get("final"):
            self.book.finish(key, "completed")
        else:  # stopped by the driver (Ctrl-C) before it ended
            self.book.finish(key, "cancelled", cancel=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.ray_lost():
            return
        key = trial.config["trial_key"]
        error = None
        try:
            error = Path(trial.error_file).read_text() if trial.error_file else None
        except OSError:
            pass
        self.book.finish(key, "failed", error=error or "trial failed (no error text)", cancel=True)
