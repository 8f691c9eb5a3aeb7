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

:class:`JobMonitor` adds the jobs' files for a sweep: one asyncio loop looks at every trial's
metrics and result file each ``poll_interval_s`` and wakes only the trials whose job changed
(:mod:`ltssl.sweep.trainable` runs it as one Ray actor; this module imports neither Ray nor Tune,
so that actor's process is small and starts fast).
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from typing import Callable, Iterable

from ltssl.launch.slurm_state import JobView, Observation, QueryError, observe

#: Shortest time between two rounds, seconds: at most one squeue (plus at most one sacct) per
#: this many seconds for the whole sweep, however many jobs are in flight.
MIN_INTERVAL_S = 2.5
#: Longest time between two rounds in steady state, seconds.
MAX_INTERVAL_S = 30.0
#: Longest wait after failed rounds (doubling from MIN_INTERVAL_S), seconds.
BACKOFF_MAX_S = 60.0
#: :class:`JobMonitor` drops a job it has not been asked about for this long, seconds (its trial
#: ended without saying).
MONITOR_EXPIRY_S = 120.0


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


# --------------------------------------------------------------------------- jobs and their files


class _Watched:
    """One trial's job as the monitor follows it: what to look at, and a version that moves on change."""

    def __init__(self, job: dict):
        self.job = job                 # {"job_id", "executor", "files": [paths]}
        self.version = 0
        self.seen: tuple = ()          # (size or mtime of each file, controller alive) last time
        self.event = asyncio.Event()
        self.last_wait = time.monotonic()

    def look(self) -> tuple:
        marks = []
        for path in self.job["files"]:
            try:
                stat = os.stat(path)
                marks.append((stat.st_size, stat.st_mtime_ns))
            except OSError:
                marks.append(None)
        if self.job["executor"] == "local":  # the controller's pid (a killed job writes no file)
            marks.append(os.path.exists(f"/proc/{self.job['job_id']}"))
        return tuple(marks)

    def bump(self) -> None:
        self.version += 1
        self.event.set()


class JobMonitor:
    """One watcher of many jobs and their files for a sweep (run as one async Ray actor by
    :mod:`ltssl.sweep.trainable`; plain asyncio here, no Ray import).

    Each job is registered by the first :meth:`wait` of its trial (``key``); its files (metrics,
    result) are looked at every ``poll_interval_s``, its Slurm state comes from one batched
    :class:`SlurmStateMonitor` round for all jobs. Trials call :meth:`wait` with their job and the version they last saw; it returns
    ``(version, observation)`` as soon as the job changed (a new metrics line, a result file, a
    Slurm state), or after ``timeout_s``. ``observation`` is the job's part of the last batched
    Slurm query (None for local jobs and before the first round).
    """

    def __init__(self, poll_interval_s: float = 0.5):
        self.poll_interval_s = poll_interval_s
        self.slurm = SlurmStateMonitor()
        self.entries: dict[str, _Watched] = {}
        self._loop_task: asyncio.Task | None = None

    async def wait(self, key: str, job: dict, version: int, timeout_s: float):
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        entry = self.entries.get(key)
        if entry is None or entry.job["job_id"] != job["job_id"]:
            entry = self.entries[key] = _Watched(job)
            entry.seen = entry.look()
            if job["executor"] == "slurm":
                self.slurm.watch([job["job_id"]])
        entry.last_wait = time.monotonic()
        if entry.version == version:
            entry.event.clear()
            try:
                await asyncio.wait_for(entry.event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return entry.version, self._observation(entry)

    def _observation(self, entry: _Watched) -> Observation | None:
        return self.slurm.observation_for(entry.job["job_id"]) if entry.job["executor"] == "slurm" else None

    def forget(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None and entry.job["executor"] == "slurm":
            self.slurm.forget([entry.job["job_id"]])

    def stats(self) -> dict:
        """Counters for tests and benchmarks: rounds, Slurm calls, interval, failures, trials watched."""
        return {"rounds": self.slurm.rounds, "calls": dict(self.slurm.calls), "interval_s": self.slurm.interval_s,
                "failures": self.slurm.failures, "watched": len(self.entries), "pid": os.getpid()}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self._tick()
            except Exception:  # pylint: disable=broad-except  # one bad look must not end the watching
                traceback.print_exc()  # (into the actor's log under Ray's session folder)

    async def _tick(self) -> None:
        """Look at every trial's files; run a Slurm round when due; wake the trials whose job changed."""
        now = time.monotonic()
        for key, entry in list(self.entries.items()):
            if now - entry.last_wait > MONITOR_EXPIRY_S:
                self.forget(key)
                continue
            seen = entry.look()
            if seen != entry.seen:
                if entry.job["executor"] == "slurm" and seen[-1] != entry.seen[-1]:
                    self.slurm.soon()  # a result file appeared: the job is ending, ask Slurm soon
                entry.seen = seen
                entry.bump()
        ids = self.slurm.due_ids()
        if ids is not None:
            observation = await asyncio.to_thread(observe, ids)  # the loop keeps serving waits meanwhile
            changed = set(self.slurm.record(ids, observation))
            for entry in self.entries.values():
                if entry.job["job_id"] in changed and entry.job["executor"] == "slurm":
                    entry.bump()
