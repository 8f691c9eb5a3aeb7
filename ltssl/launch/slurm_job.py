"""A training job on Slurm, followed through squeue/sacct (or a monitor that asks for many jobs)."""

from __future__ import annotations

import os
from typing import Any, Callable

from ltssl.launch import slurm
from ltssl.launch.errors import LaunchError
from ltssl.launch.handle import JobHandle
from ltssl.launch.slurm import TERMINAL_STATES
from ltssl.launch.slurm_state import ControllerClock, JobStatus, Observation, observe, resolve

DEFAULT_CONTROLLER_DOWNTIME_S = 600.0  # job.json written before the setting existed

StateSource = Callable[[str], Observation]  # job id -> an observation that covers that job


def observe_one(job_id: str) -> Observation:
    """The default state source: squeue (then sacct) for this one job."""
    return observe([job_id])


class SlurmJob(JobHandle):
    """A job submitted with sbatch (through submitit).

    Args (beyond :class:`JobHandle`'s):
        controller_downtime_s: how long slurmctld may stay unreachable before the handle gives up
            on the job (``launch.controller_downtime_s``); meanwhile its last state stands.
        state_source: ``job_id -> Observation`` (:mod:`ltssl.launch.slurm_state`); default: one
            squeue/sacct query per look. A sweep's monitor passes one that answers from a single
            query for all its jobs. The decision (:func:`~ltssl.launch.slurm_state.resolve`) is the
            same either way.
    """

    executor = "slurm"
    poll_s = 1.0

    def __init__(
        self,
        run_dir: str | os.PathLike,
        job_id: str,
        *,
        num_tasks: int = 1,
        submitted_at: float | None = None,
        partition: str | None = None,
        controller_downtime_s: float = DEFAULT_CONTROLLER_DOWNTIME_S,
        state_source: StateSource | None = None,
    ) -> None:
        super().__init__(run_dir, job_id, num_tasks=num_tasks, submitted_at=submitted_at, partition=partition)
        self.controller_downtime_s = float(controller_downtime_s)
        self.state_source = state_source
        self._clock = ControllerClock()
        self._last: JobStatus | None = None
        self._node_list: str | None = None

    @classmethod
    def from_record(cls, run_dir: str | os.PathLike, data: dict) -> SlurmJob:
        handle = super().from_record(run_dir, data)
        handle.controller_downtime_s = float(data.get("controller_downtime_s", DEFAULT_CONTROLLER_DOWNTIME_S))
        return handle

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["state_source"] = None  # a monitor stays in its process; the copy queries for itself
        return state

    # ------------------------------------------------------------------ state

    def status(self) -> JobStatus:
        """Look at the job once: its resolved :class:`JobStatus` (also sets :attr:`lost_reason`)."""
        observation = (self.state_source or observe_one)(self.job_id)
        status = resolve(
            self.job_id,
            observation,
            unreachable_s=self._clock.unreachable_s(observation),
            tolerated_s=self.controller_downtime_s,
            last=self._last,
        )
        if status.state != "UNKNOWN":
            self._last = status
        if status.nodes:
            self._node_list = status.nodes
        self.lost_reason = status.error
        return status

    @property
    def state(self) -> str:
        state = self.status().state
        if state not in TERMINAL_STATES and self._cancelled and not self._succeeded():
            return "CANCELLED"
        return state

    @property
    def node_list(self) -> str | None:
        if self._node_list is None:
            self.status()
            self._node_list = self._node_list or self.job_record().get("node_list")
        return self._node_list

    def _final_result(self) -> tuple[str, Any] | None:
        """Rank 0's success; an error is final only once the job has ended.

        After a node failure the surviving rank of the interrupted attempt writes an error result,
        then Slurm requeues the job and the next attempt replaces it, so an error read while the job
        is not in a terminal state may be stale (:meth:`result` reads it again once the job has ended).
        """
        outcome = self._read_result(0)
        return None if outcome is not None and outcome[0] == "error" else outcome

    def _has_ended(self) -> bool:
        return self.state in TERMINAL_STATES

    def _kill(self) -> None:
        try:
            slurm.cancel(self.job_id)
        except LaunchError:
            if self.status().state not in TERMINAL_STATES:  # a job that has just ended is not an error
                raise
