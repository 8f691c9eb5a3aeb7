"""The handle of a submitted training job: one interface, a Slurm and a local implementation.

:class:`JobHandle` holds what both kinds share: the run folder's files
(:class:`~ltssl.launch.run_folder.RunFolder`: logs, the tasks' outcomes, the error of a failed job),
waiting for a result, cancellation's bookkeeping, and :meth:`JobHandle.attach`, which re-creates
the right kind from ``job.json``.
:class:`ltssl.launch.slurm_job.SlurmJob` follows a job through squeue/sacct,
:class:`ltssl.launch.local_job.LocalJob` through its controller's process.
"""

from __future__ import annotations

import abc
import json
import math
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from ltssl.launch.errors import JobCancelledError, JobFailedError, LaunchError
from ltssl.launch.job import update_job_json
from ltssl.launch.run_folder import RunFolder
from ltssl.launch.slurm import TERMINAL_STATES


class JobHandle(RunFolder, abc.ABC):
    """A submitted training job: its state, its rank-0 result, cancellation.

    Attributes:
        job_id: Slurm's job id, or the local controller's pid.
        run_dir: the job's folder.
        executor: ``"slurm"`` or ``"local"`` (the implementation's kind).
        partition: the Slurm partition, None for local jobs.
        num_tasks: processes of the job (nodes x tasks per node).
        lost_reason: a one-line reason once the handle has given up following the job (Slurm: its
            controller unreachable for too long), else None.
    """

    executor: ClassVar[str]
    poll_s: ClassVar[float] = 1.0  # default pause between two looks at the job (s)
    poll_cap_s: ClassVar[float] = math.inf  # wait() never pauses longer than this (s)
    _kinds: ClassVar[dict[str, type[JobHandle]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "executor" in cls.__dict__:
            JobHandle._kinds[cls.executor] = cls

    def __init__(
        self,
        run_dir: str | os.PathLike,
        job_id: str,
        *,
        num_tasks: int = 1,
        submitted_at: float | None = None,
        partition: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.job_id = str(job_id)
        self.num_tasks = num_tasks
        self.partition = partition
        self.submitted_at = submitted_at if submitted_at is not None else 0.0
        self.lost_reason: str | None = None
        self._cancelled = False

    # ------------------------------------------------------------------ re-attaching

    @classmethod
    def attach(cls, run_dir: str | os.PathLike) -> JobHandle:
        """The handle of the job last submitted into ``run_dir`` (from its job.json), of the kind
        job.json names. Works from another process (a restarted sweep driver)."""
        path = Path(run_dir) / "job.json"
        if not path.is_file():
            raise LaunchError(f"{path} does not exist: nothing was submitted into {run_dir}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise LaunchError(f"{path} is not valid JSON ({error.msg}): resubmit into another run folder") from None
        kind = data.get("executor", "slurm")
        if kind not in JobHandle._kinds:
            raise LaunchError(f"{path}: executor must be one of {', '.join(sorted(JobHandle._kinds))}, got {kind!r}")
        return JobHandle._kinds[kind].from_record(run_dir, data)

    @classmethod
    def from_record(cls, run_dir: str | os.PathLike, data: dict) -> JobHandle:
        """A handle from a job.json dict."""
        return cls(
            run_dir,
            data["job_id"],
            num_tasks=int(data.get("num_tasks", 1)),
            submitted_at=float(data.get("submitted", 0.0)),
            partition=data.get("partition"),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(job_id={self.job_id!r}, executor={self.executor!r}, run_dir='{self.run_dir}')"

    # ------------------------------------------------------------------ what each kind provides

    @property
    @abc.abstractmethod
    def state(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... (Slurm's names, also locally)."""

    @property
    @abc.abstractmethod
    def node_list(self) -> str | None:
        """The node(s) the job runs or ran on; None while pending."""

    @abc.abstractmethod
    def _final_result(self) -> tuple[str, Any] | None:
        """Rank 0's outcome when it is final, else None."""

    @abc.abstractmethod
    def _has_ended(self) -> bool:
        """Whether the job is known to have ended (cancel() then leaves it alone)."""

    @abc.abstractmethod
    def _kill(self) -> None:
        """End the job and all its processes now."""

    # ------------------------------------------------------------------ results on disk

    def _was_cancelled(self) -> bool:
        return self._cancelled or "cancelled" in self.job_record()

    def _succeeded(self) -> bool:
        outcome = self._read_result(0)
        return outcome is not None and outcome[0] == "success"

    def done(self) -> bool:
        """Whether the job has ended (or its rank-0 result is already there, or the handle gave up)."""
        if self._final_result() is not None:
            return True
        return self.state in TERMINAL_STATES or self.lost_reason is not None

    # ------------------------------------------------------------------ waiting

    def result(self, timeout: float | None = None, poll_s: float | None = None) -> Any:
        """Wait for the job and return rank 0's result.

        Raises:
            JobCancelledError: "job <id> was cancelled" (at once; no wait for files that will not come).
            JobFailedError: the job raised (message + remote traceback), Slurm ended it (FAILED,
                TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...; message + the tail of its stderr), or the
                handle gave up following it (:attr:`lost_reason`, one line).
            LaunchError: still not done after ``timeout`` seconds.
        """
        poll_s = poll_s if poll_s is not None else self.poll_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self._final_result()
            if outcome is not None and outcome[0] == "success":  # (it may have finished as it was cancelled)
                return outcome[1]
            if self._was_cancelled():
                raise JobCancelledError(f"job {self.job_id} was cancelled")
            if outcome is not None:
                return self._unwrap(outcome)
            state = self.state
            if state in TERMINAL_STATES:
                return self._result_after_end(state)
            if self.lost_reason is not None:
                raise JobFailedError(self.lost_reason)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"job {self.job_id} is still {state} after {timeout:g} s")
            time.sleep(poll_s)

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> str:
        """Block until the job ends (or ``timeout`` s pass); return its state. Never raises on failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(min(poll_s, self.poll_cap_s))
        return self.state

    # ------------------------------------------------------------------ cancel

    def cancel(self) -> None:
        """End the job and all its processes now; later ``result()`` raises JobCancelledError.

        Slurm: ``scancel`` (rank 0 saves a checkpoint on the SIGTERM and every task exits at once).
        Local: SIGTERM to the job's process group, SIGKILL after 2 s for anything left (works from a
        Ray worker, where SIGINT is blocked). Returns within about 2 s. A job that has already
        ended is left as it is (its result stays readable).
        """
        if self._succeeded() or self._has_ended():
            return
        self._cancelled = True
        update_job_json(self.run_dir, cancelled=time.time())
        self._kill()
