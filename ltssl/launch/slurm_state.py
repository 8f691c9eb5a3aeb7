"""Where a Slurm job stands, from what squeue and sacct answer, tolerant of either being down.

Two sources, one decision:

* **squeue** answers from slurmctld's memory: every state of a queued or running job and, for
  ``MinJobAge`` seconds after the end, of a finished one. When slurmctld is down or restarting it
  does not answer at all (:class:`QueryError`).
* **sacct** answers from the accounting database (slurmdbd, MariaDB) once slurmctld has forgotten
  the job; it may lag behind slurmctld, and it is down whenever slurmdbd or MariaDB is.

:func:`observe` asks both for any number of jobs at once (one squeue call; one sacct call for the
jobs squeue does not know) and returns an :class:`Observation`; :func:`resolve` turns one job's part
of it into a :class:`JobStatus`. A handle (:class:`ltssl.launch.slurm_job.SlurmJob`) or a monitor
that polls all the jobs of a sweep at once share :func:`resolve`, so both tolerate the same faults:

* slurmctld unreachable: the last state seen stands (the job keeps running without its
  controller) until it has been unreachable for longer than the tolerated downtime
  (``launch.controller_downtime_s``); then the status carries a one-line error;
* accounting down: squeue's state while slurmctld remembers the job, else UNKNOWN (not an end):
  nothing is declared failed for lack of accounting, and the job is resolved once sacct answers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ltssl.launch.local import child_env
from ltssl.launch.slurm import COMMAND_TIMEOUT_S, TERMINAL_STATES, normalise_state

UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class JobView:
    """One job as one source reports it: the normalised state (``CANCELLED by 0`` -> ``CANCELLED``)
    and the node list (None while pending)."""

    state: str
    nodes: str | None = None


@dataclass(frozen=True)
class QueryError:
    """A source did not answer (timeout, daemon down, client missing): the one-line reason."""

    message: str


Answer = Mapping[str, JobView] | QueryError  # job id -> view, or why there is no answer


@dataclass(frozen=True)
class Observation:
    """What squeue and sacct said, at ``time`` (``time.time()``, s).

    ``sacct`` is None when it was not asked (squeue knew every job in question)."""

    squeue: Answer
    sacct: Answer | None
    time: float


@dataclass(frozen=True)
class JobStatus:
    """The resolved state of one job.

    ``state``: Slurm's long name (RUNNING, COMPLETED, OUT_OF_MEMORY, ...) or UNKNOWN while no source
    can tell; ``error``: a one-line reason when the job must be given up on (its controller has been
    unreachable past the tolerated downtime), else None.
    """

    state: str
    nodes: str | None = None
    error: str | None = None


# ----------------------------------------------------------------------------- the decision


def resolve(
    job_id: str,
    observation: Observation,
    *,
    unreachable_s: float = 0.0,
    tolerated_s: float = 600.0,
    last: JobStatus | None = None,
) -> JobStatus:
    """One job's status from an observation.

    Args:
        job_id: the Slurm job id.
        observation: what squeue and sacct said.
        unreachable_s: how long (s) squeue has failed without a break, up to this observation
            (0 when it answered; see :class:`ControllerClock`).
        tolerated_s: the controller downtime after which the job is given up (``error`` set).
        last: the previous status of this job, carried while no source can tell.
    """
    squeue, sacct = observation.squeue, observation.sacct
    if not isinstance(squeue, QueryError) and job_id in squeue:
        return _status(squeue[job_id])
    accounted = sacct if sacct is not None and not isinstance(sacct, QueryError) else {}
    if job_id in accounted and (accounted[job_id].state in TERMINAL_STATES or not isinstance(squeue, QueryError)):
        return _status(accounted[job_id])  # (while slurmctld is down sacct's RUNNING may be stale: see below)
    if not isinstance(squeue, QueryError):
        # slurmctld forgot the job and accounting cannot tell (down, or behind): not an end
        return JobStatus(UNKNOWN, last.nodes if last else None)
    # slurmctld unreachable: the job runs on without it; keep the last state seen
    held = last if last is not None and last.state != UNKNOWN else None
    if held is None and job_id in accounted:
        held = _status(accounted[job_id])
    if unreachable_s > tolerated_s:
        error = (
            f"slurmctld has not answered for {unreachable_s:.0f} s (more than launch.controller_downtime_s="
            f"{tolerated_s:g}), so the state of job {job_id} is unknown: {squeue.message}; {LOST_HINT}"
        )
        return JobStatus(held.state if held else UNKNOWN, held.nodes if held else None, error)
    return held if held is not None else JobStatus(UNKNOWN)


#: the end of a lost job's error (a handle that gave up past launch.controller_downtime_s): the
#: sweep recognises it in a failed trial's error and lets --resume pick that trial up (:func:`lost_job`)
LOST_HINT = "restart slurmctld, then --resume re-attaches to the job if it still runs"


def lost_job(error: str | None) -> bool:
    """Whether a trial's ``error`` is a handle giving up on an unreachable slurmctld (not the job's end)."""
    return bool(error) and "launch.controller_downtime_s" in error and LOST_HINT in error


def _status(view: JobView) -> JobStatus:
    return JobStatus(view.state, view.nodes)


class ControllerClock:
    """How long squeue has failed without a break: fed every observation, in time order."""

    def __init__(self) -> None:
        self.failing_since: float | None = None

    def unreachable_s(self, observation: Observation) -> float:
        """Seconds from the first failed squeue of the current run of failures to ``observation``."""
        if not isinstance(observation.squeue, QueryError):
            self.failing_since = None
            return 0.0
        if self.failing_since is None:
            self.failing_since = observation.time
        return observation.time - self.failing_since


# ----------------------------------------------------------------------------- the queries


def _command(args: list[str]) -> str | QueryError:
    """stdout of a Slurm client command, or why it gave none."""
    if shutil.which(args[0]) is None:
        return QueryError(f"{args[0]} not found (Slurm's client commands are not installed here)")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=child_env())
    except subprocess.TimeoutExpired:
        return QueryError(f"{args[0]} did not answer in {COMMAND_TIMEOUT_S} s")
    except OSError as error:  # a busy machine may fail to start the client: the next poll retries
        return QueryError(f"{args[0]} could not start: {error}")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        message = lines[-1] if lines else f"exit {proc.returncode}"
        # squeue -j <one purged id> exits 1: an answer ("not known"), not a failure
        if args[0] == "squeue" and "Invalid job id" in message:
            return ""
        return QueryError(f"{args[0]} failed: {message}")
    return proc.stdout


def query_squeue(job_ids: Iterable[str] | None = None) -> Answer:
    """squeue's view of ``job_ids`` (None: every job it knows), including just-finished jobs."""
    args = ["squeue", "-h", "--states=all", "-o", "%i|%T|%N"]
    ids = None if job_ids is None else sorted({str(j) for j in job_ids})
    if ids is not None:
        if not ids:
            return {}
        args += ["-j", ",".join(ids)]
    out = _command(args)
    if isinstance(out, QueryError):
        return out
    views = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[0]:
            views[fields[0]] = JobView(normalise_state(fields[1]), fields[2].strip() or None)
    return views


def query_sacct(job_ids: Iterable[str]) -> Answer:
    """The accounting database's view of ``job_ids`` (allocations only, latest attempt)."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    out = _command(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,State,NodeList"])
    if isinstance(out, QueryError):
        return out
    views = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[0] in ids:
            nodes = fields[2].strip()
            views[fields[0]] = JobView(normalise_state(fields[1]), None if nodes in ("", "None assigned") else nodes)
    return views


def observe(job_ids: Iterable[str]) -> Observation:
    """One squeue call for all ``job_ids``, then one sacct call for those squeue did not report
    (or for all of them, when squeue did not answer)."""
    ids = sorted({str(j) for j in job_ids})
    squeue = query_squeue(ids)
    missing = ids if isinstance(squeue, QueryError) else [j for j in ids if j not in squeue]
    sacct = query_sacct(missing) if missing else None
    return Observation(squeue, sacct, time.time())
