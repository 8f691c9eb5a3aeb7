"""The driver's loop: Ray Tune's searcher and scheduler over every trial's job, with no process per trial.

A trial only waits on a Slurm job and reads a file, so it needs no process of its own (one Ray
actor per trial cost about 120 MB each, and every actor asked Slurm about its own job). The
driver itself runs what Tune's controller ran, every ``poll_interval_s`` seconds:

1. **fill**: while fewer than ``max_concurrent`` trials are in flight, ask the searcher
   (:class:`~ltssl.sweep.searcher.SweepSearcher`, Tune's ``Searcher`` API) for the next trial, add it
   to the scheduler and start its job in a small thread pool (claim in the ledger, re-attach or
   submit: :meth:`ltssl.sweep.trial.TrialJob.launch`);
2. **look at Slurm**: when due, one batched ``squeue`` (then ``sacct`` for the jobs squeue no longer
   knows) for every job in flight, in a thread (:class:`~ltssl.launch.monitor.SlurmStateMonitor`:
   adaptive interval, failures retried with backoff, never a failed trial);
3. **follow each trial**: new metrics lines go to the scheduler
   (:class:`~ltssl.sweep.scheduler.GroupedASHA`, Tune's ``TrialScheduler`` API) one by one, in order;
   a STOP ends the trial (``stopped_early``, job cancelled); an ended job's result (or error) is
   taken in a thread and the trial recorded (:class:`~ltssl.sweep.bookkeeping.Bookkeeper`).

The cost of a look is a ``stat`` per trial in flight and one Slurm query per interval for all of
them; a finished trial adds its rows to the results once. Each trial in flight is also a Ray
placement group named after it (``t0003 [digits/r=10/lt/simsiam] rho=0.05``) holding one
``sweep_trial_slot``: it costs no process, and Ray's dashboard lists the running trials (its job
page, placement groups) and the slots in use (cluster resources).

Ctrl-C (KeyboardInterrupt) and the driver's SIGTERM handler end :meth:`SweepLoop.run` by raising;
launches still in their thread finish first, so the ledger names every job that was submitted.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher
from ray.util.placement_group import placement_group, remove_placement_group

from ltssl.launch import LaunchError, SlurmJob
from ltssl.launch.monitor import SlurmStateMonitor
from ltssl.launch.slurm_state import observe
from ltssl.sweep.bookkeeping import Bookkeeper
from ltssl.sweep.trial import Trial, TrialJob, describe

#: Ray resource that bounds the trials in flight (one per trial, max_concurrent in all).
TRIAL_SLOT = "sweep_trial_slot"
#: Threads that launch jobs (sbatch) and take ended jobs' results at once.
LAUNCH_THREADS = 8
#: Seconds of one look spent starting new trials at most: a large sweep's first fill (hundreds of
#: trials) is spread over many looks, so the trials already in flight are followed meanwhile.
FILL_BUDGET_S = 0.25


class SweepLoop:
    """Runs the sweep's trials until none is left (see the module docstring).

    Args:
        book: ledger, results and console of the sweep.
        searcher: Tune ``Searcher`` whose ``suggest`` returns trial configs with ``trial_key``.
        scheduler: Tune ``TrialScheduler`` (``GroupedASHA``) or None (every trial runs to its end).
        max_concurrent: trials in flight at most.
        poll_interval_s: seconds between two looks at every trial's files.
        target, target_kwargs: what each job runs.
        ray_lost: returns why the driver's Ray died (or None); then nothing more is recorded.
        named_in_ray: hold a named placement group per trial in flight (Ray's dashboard lists them).
    """

    def __init__(self, book: Bookkeeper, searcher: Searcher, scheduler: TrialScheduler | None, *,
                 max_concurrent: int, poll_interval_s: float, target: str, target_kwargs: dict | None,
                 ray_lost: Callable[[], str | None] = lambda: None, named_in_ray: bool = True):
        self.book, self.searcher, self.scheduler = book, searcher, scheduler
        self.max_concurrent, self.poll_interval_s = max_concurrent, poll_interval_s
        self.target, self.target_kwargs = target, target_kwargs
        self.ray_lost, self.named_in_ray = ray_lost, named_in_ray
        self.slurm = SlurmStateMonitor()
        self.live: dict[str, Trial] = {}                 # trial_id -> trial in flight
        self.groups: dict[str, object] = {}              # trial_id -> its placement group
        self.exhausted = False
        self.started = 0
        self._query: Future | None = None
        self._query_ids: list[str] = []
        self._threads = ThreadPoolExecutor(max_workers=LAUNCH_THREADS, thread_name_prefix="trial")
        self._slurm_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slurm-monitor")

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Until every trial is over; KeyboardInterrupt (Ctrl-C, SIGTERM) propagates."""
        try:
            while True:
                self._fill()
                if self.exhausted and not self.live:
                    return
                self._look_at_slurm()
                for trial in list(self.live.values()):
                    if self.ray_lost():
                        return
                    self._follow(trial)
                self.book.flush()
                time.sleep(self.poll_interval_s)
        finally:
            # A submission under way ends (and is written to the ledger) before anything else.
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._slurm_thread.shutdown(wait=False, cancel_futures=True)

    def _fill(self) -> None:
        deadline = time.monotonic() + FILL_BUDGET_S
        while not self.exhausted and len(self.live) < self.max_concurrent and time.monotonic() < deadline:
            trial_id = f"run{self.started:05d}"
            config = self.searcher.suggest(trial_id)
            if config is None:
                return  # not now (a searcher waiting for results)
            if config == Searcher.FINISHED:
                self.exhausted = True
                return
            self.started += 1
            self._start(trial_id, config)

    def _start(self, trial_id: str, config: dict) -> None:
        key = config["trial_key"]
        job = TrialJob(key, self.book.ledger, target=self.target, target_kwargs=self.target_kwargs,
                       state_source=self.slurm.observation_for)
        trial = Trial(trial_id, config, job)
        self.live[trial_id] = trial
        if self.scheduler is not None:
            self.scheduler.on_trial_add(None, trial)
        self.book.started(key)
        if self.named_in_ray and not self.ray_lost():
            self.groups[trial_id] = placement_group([{TRIAL_SLOT: 1}], name=describe(config))
        trial.pending = self._threads.submit(job.launch)

    # ------------------------------------------------------------------ Slurm

    def _look_at_slurm(self) -> None:
        """Take a finished round's answer; start the next round when due (in its thread)."""
        if self._query is not None:
            if not self._query.done():
                return
            self.slurm.record(self._query_ids, self._query.result())
            self._query = None
        ids = self.slurm.due_ids()
        if ids is not None:
            self._query_ids, self._query = ids, self._slurm_thread.submit(observe, ids)

    # ------------------------------------------------------------------ one trial

    def _follow(self, trial: Trial) -> None:
        if trial.pending is not None:
            if not trial.pending.done():
                return
            future, trial.pending = trial.pending, None
            if trial.phase == "launching":
                self._launched(trial, future)
            else:
                self._ended(trial, future)
            return
        if trial.phase != "running":
            return
        for line in trial.tail.read():
            if self._result(trial, trial.report(line)) == TrialScheduler.STOP:
                return
        handle = trial.job.handle
        if isinstance(handle, SlurmJob) and not trial.result_seen and handle.paths(0).result_pickle.exists():
            # The job wrote its result (or error): it is ending, and an error needs Slurm's final state.
            trial.result_seen = True
            self.slurm.soon()
        if handle.done():
            for line in trial.tail.read():  # lines written just before the end
                self._result(trial, trial.report(line))
            trial.phase = "ending"
            trial.pending = self._threads.submit(trial.job.result)

    def _launched(self, trial: Trial, future: Future) -> None:
        try:
            handle = future.result()
        except Exception as error:  # noqa: BLE001  (sbatch refused, a failed job found on resume, ...)
            self._failed(trial, _error_text(error))
            return
        if isinstance(handle, SlurmJob):
            self.slurm.watch([handle.job_id])
        trial.phase = "running"

    def _result(self, trial: Trial, result: dict) -> str:
        action = TrialScheduler.CONTINUE
        if self.scheduler is not None:
            action = self.scheduler.on_trial_result(None, trial, result)
        if action == TrialScheduler.STOP:
            self._close(trial, result)
            self.book.finish(trial.key, "stopped_early", cancel=True)
        return action

    def _ended(self, trial: Trial, future: Future) -> None:
        try:
            result = trial.final(future.result())
        except Exception as error:  # noqa: BLE001  (JobFailedError, JobCancelledError, a lost controller)
            self._failed(trial, _error_text(error))
            return
        self._close(trial, result)
        self.book.finish(trial.key, "completed")

    def _failed(self, trial: Trial, error: str) -> None:
        if self.ray_lost():
            return  # the driver is stopping; --resume looks at this job again
        if self.scheduler is not None:
            self.scheduler.on_trial_error(None, trial)
        self._forget(trial)
        self.searcher.on_trial_complete(trial.trial_id, None, error=True)
        self.book.finish(trial.key, "failed", error=error, cancel=True)

    def _close(self, trial: Trial, result: dict) -> None:
        """The trial is over: scheduler and searcher told (Tune's order), its job and slot let go."""
        if self.scheduler is not None:
            self.scheduler.on_trial_complete(None, trial, result)
        self._forget(trial)
        self.searcher.on_trial_complete(trial.trial_id, result)

    def _forget(self, trial: Trial) -> None:
        self.live.pop(trial.trial_id, None)
        handle = trial.job.handle
        if isinstance(handle, SlurmJob):
            self.slurm.forget([handle.job_id])
        group = self.groups.pop(trial.trial_id, None)
        if group is not None and not self.ray_lost():
            remove_placement_group(group)


def _error_text(error: BaseException) -> str:
    """A trial's error as recorded: a launch error's own text (one line first), else type and message."""
    if isinstance(error, (LaunchError, RuntimeError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"
