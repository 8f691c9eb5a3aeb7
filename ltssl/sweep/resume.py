"""A resumed sweep: settle what happened while no driver ran, and show the trials already over.

Jobs that ended are recorded (completed or failed, with the job's traceback); jobs still queued
or running are left for their trial to re-attach to; the rest are resubmitted on their own
run_dir, so they resume from their checkpoints. A trial that failed only because its handle gave
up on an unreachable slurmctld (past ``launch.controller_downtime_s``) is looked at again the same
way: its job may have run on, or ended, meanwhile. Trials that finished earlier feed the scheduler's
rungs, so new trials are ranked against them.
"""

from __future__ import annotations

from ltssl.launch.slurm_state import lost_job
from ltssl.results import RESULT_STATUSES
from ltssl.sweep.bookkeeping import Bookkeeper
from ltssl.sweep.trial import reconcile


def settle_unfinished(book: Bookkeeper, scheduler) -> dict[str, int]:
    """Record the trials whose jobs ended while no driver ran; count what is left to do."""
    counts = {"finished_while_away": 0, "failed_while_away": 0, "reattach": 0, "resubmit": 0}
    for record in book.ledger.all():
        key = record["trial_id"]
        lost = record["status"] == "failed" and lost_job(record.get("error"))
        if record["status"] in ("submitting", "running", "cancelled") or lost:
            action, value = reconcile(record)
            if lost and action in ("attach", "submit"):
                # the resumed driver runs it again: its trial re-attaches (or resubmits on its run_dir)
                record = book.ledger.update(key, status="running", error=None)
            elif lost:
                book.ledger.update(key, error=None)  # the job's own end replaces the controller's error
            if action == "finished":
                book.finish(key, "completed")
                counts["finished_while_away"] += 1
                record = book.ledger.read(key)
            elif action == "failed":
                book.finish(key, "failed", error=value)
                counts["failed_while_away"] += 1
                record = book.ledger.read(key)
            elif action == "attach":
                counts["reattach"] += 1
            else:
                counts["resubmit"] += 1
        if scheduler is not None and record["status"] in ("completed", "stopped_early"):
            scheduler.seed_history(record["group"], key, [tuple(x) for x in record.get("metric_history") or []])
    return counts


def report_resume(book: Bookkeeper, scheduler, console, output_dir) -> None:
    """Settle the resumed sweep in ``output_dir`` and say what is left, in one line."""
    console.print(f"resuming {output_dir}")
    counts = settle_unfinished(book, scheduler)
    console.print(
        f"  {counts['finished_while_away']} trial(s) finished while no driver ran, {counts['failed_while_away']} failed; "
        f"{counts['reattach']} job(s) to re-attach, {counts['resubmit']} trial(s) to resubmit on their run_dir "
        f"(from their checkpoints)"
    )


def show_finished(book: Bookkeeper) -> None:
    """Put the trials that are already over on the board (a resumed sweep starts with them)."""
    for record in book.ledger.all():
        if record["status"] in RESULT_STATUSES:
            book.board.set_status(record["trial_id"], record["status"])
            if record["status"] == "completed":
                book.board.offer(record["group"], record["trial_id"], record.get("metric_value"), record.get("params") or {})
