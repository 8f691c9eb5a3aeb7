"""One job-state monitor for many Slurm jobs: one batched ``squeue`` per interval, ``sacct`` for the rest.

A sweep keeps tens to hundreds of jobs in flight for days. Asking Slurm about each job on its own
(one ``squeue -j <id>`` per job every few seconds) makes the user's RPC rate grow with the sweep,
and ``squeue(1)`` asks not to be run from loops. :class:`SlurmStateMonitor` asks about every job it
watches at once, through :func:`ltssl.launch.slurm_state.observe`::

    squeue -h -j id1,id2,... --states=all -o %i|%T|%N       # every job slurmctld still remembers
    sacct -n -X -P -j idA,idB,... -o JobID,State,NodeList   # only those squeue no longer knows

and keeps the last :class:`~ltssl.launch.slurm_state.Observation`. A job's handle reads its part of
it (:meth:`SlurmStateMonitor.observation_for`, no Slurm call) as its ``state_source``
(:class:`ltssl.launch.slurm_job.SlurmJob`), so the decision of what a failed or partial answer means
(:func:`ltssl.launch.slurm_state.resolve`) is the same with or without the monitor.

The interval adapts like submitit's ``SlurmInfoWatcher``: half the time since the last change (a job
added or removed, a state that moved), between ``min_interval_s`` and ``max_interval_s``, so it is
short while jobs start or end and long in steady state. A failed squeue (slurmctld restarting, a
timeout, a non-zero exit) is transient: the observation says so (the handle keeps the last state it
saw), the failure is counted, and the next round comes after an exponential backoff. Nothing here
raises because Slurm did not answer.

A sweep's driver owns one (:class:`ltssl.sweep.loop.SweepLoop`): it runs each round's query in a
thread (:meth:`SlurmStateMonitor.due_ids`, then :meth:`SlurmStateMonitor.record`) and gives every
trial's handle :meth:`SlurmStateMonitor.observation_for` as its state source.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from ltssl.launch.slurm_state import JobView, Observation, QueryError, observe

#: Shortest time between two rounds, seconds: at most one squeue (plus at most one sacct) per
#: this many seconds for the whole sweep, however many jobs are in flight.
MIN_INTERVAL_S = 2.5
#: Longest time between two rounds in steady state, seconds.
MAX_INTERVAL_S = 30.0
#: Longest wait after failed rounds (doubling from MIN_INTERVAL_S), seconds.
BACKOFF_MAX_S = 60.0


def _slice(answer, job_id: str):
    """One job's part of a source's answer (a QueryError or None stays as it is)."""
    if answer is None or isinstance(answer, QueryError):
        return answer
    return {job_id: answer[job_id]} if job_id in answer else {}


def _view(observation: Observation, job_id: str) -> JobView | None:
    """What the observation says of the job (squeue first, then sacct); None when neither knows it."""
    for answer in (observation.squeue, observation.sacct):
        if answer is not None and not isinstance(answer, QueryError) and job_id in answer:
            return answer[job_id]
    return None


class SlurmStateMonitor:
    """The last observation of every watched job, refreshed by batched rounds (module docstring).

    One owner calls :meth:`watch`, :meth:`forget` and :meth:`poll_if_due` (or the two halves,
    :meth:`due_ids` and :meth:`record`, when the query runs in another thread).

    Args:
        min_interval_s, max_interval_s: bounds of the time between two successful rounds, seconds.
        backoff_max_s: longest wait after failed rounds, seconds.
        observe_fn: ``job ids -> Observation``; :func:`ltssl.launch.slurm_state.observe` by default.
        clock: monotonic seconds.
    """

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S, max_interval_s: float = MAX_INTERVAL_S,
                 backoff_max_s: float = BACKOFF_MAX_S,
                 observe_fn: Callable[[list[str]], Observation] = observe,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < min_interval_s <= max_interval_s:
            raise ValueError(f"min_interval_s must be > 0 and <= max_interval_s, got {min_interval_s}, {max_interval_s}")
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.backoff_max_s = backoff_max_s
        self._observe = observe_fn
        self._clock = clock
        self._jobs: dict[str, JobView | None] = {}   # job id -> its view in the last observation
        self._observation: Observation | None = None
        self._asked: frozenset[str] = frozenset()      # the jobs the last round asked about
        self._last_change = clock()
        self._next_round = clock()
        self.failures = 0                              # consecutive rounds whose squeue failed
        self.rounds = 0
        self.calls = {"squeue": 0, "sacct": 0}

    # ------------------------------------------------------------------ the watch list

    def watch(self, job_ids: Iterable[str]) -> None:
        """Follow these jobs; a new one brings the next round forward to at most ``min_interval_s``."""
        for job_id in map(str, job_ids):
            if job_id not in self._jobs:
                self._jobs[job_id] = None
                self._last_change = self._clock()
                self._next_round = min(self._next_round, self._clock() + self.min_interval_s)

    def soon(self) -> None:
        """Bring the next round forward to at most ``min_interval_s`` from now (a job is about to end)."""
        self._last_change = self._clock()
        if not self.failures:
            self._next_round = min(self._next_round, self._clock() + self.min_interval_s)

    def forget(self, job_ids: Iterable[str]) -> None:
        for job_id in map(str, job_ids):
            if self._jobs.pop(job_id, "absent") != "absent":
                self._last_change = self._clock()

    def watched(self) -> list[str]:
        return list(self._jobs)

    def observation_for(self, job_id: str) -> Observation | None:
        """The last observation, cut down to ``job_id`` (None before the first round that asked about it)."""
        job_id = str(job_id)
        obs = self._observation
        if obs is None or job_id not in self._asked:
            return None
        return Observation(_slice(obs.squeue, job_id), _slice(obs.sacct, job_id), obs.time)

    # ------------------------------------------------------------------ rounds

    @property
    def interval_s(self) -> float:
        """Seconds from one successful round to the next: half the time since the last change, bounded."""
        calm = self._clock() - self._last_change
        return min(self.max_interval_s, max(self.min_interval_s, calm / 2))

    def seconds_to_next_round(self) -> float:
        return max(0.0, self._next_round - self._clock())

    def due_ids(self) -> list[str] | None:
        """The jobs to ask about now, or None when no round is due."""
        if not self._jobs or self._clock() < self._next_round:
            return None
        return sorted(self._jobs, key=lambda j: (len(j), j))

    def poll_if_due(self) -> bool:
        """Run one round if its time has come; True when a round ran (successful or not)."""
        ids = self.due_ids()
        if ids is None:
            return False
        self.record(ids, self._observe(ids))
        return True

    def record(self, ids: list[str], observation: Observation) -> list[str]:
        """Take the observation of a round over ``ids``; returns the watched jobs whose view changed."""
        self.rounds += 1
        self.calls["squeue"] += 1
        self.calls["sacct"] += observation.sacct is not None
        self._observation = observation
        self._asked = frozenset(ids)
        changed = []
        for job_id in ids:
            if job_id not in self._jobs:
                continue  # forgotten while the query ran
            view = _view(observation, job_id)
            if view is None and isinstance(observation.squeue, QueryError):
                continue  # no answer is not a change
            if view != self._jobs[job_id]:
                self._jobs[job_id] = view
                changed.append(job_id)
        if changed:
            self._last_change = self._clock()
        self._schedule(ok=not isinstance(observation.squeue, QueryError))
        return changed

    def _schedule(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            self._next_round = self._clock() + self.interval_s
        else:
            self.failures += 1
            self._next_round = self._clock() + min(self.backoff_max_s, self.min_interval_s * 2 ** self.failures)
