"""A training job on this machine (submitit's local executor), followed through its processes.

The job id is the pid of the job's controller (:mod:`ltssl.launch._local_controller`), which leads
a session of its own: its process group (pgid = job id) holds the controller, the tasks and their
data-loader workers. The job runs while any of them does. Checking the group and not only the
controller matters: a process that started the controller may take it down when it exits (Ray
kills a worker's child processes when the worker exits, e.g. after the sweep driver was killed),
while the tasks, which are the controller's children, keep training and write their result.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from ltssl.launch import local as local_exec
from ltssl.launch.handle import JobHandle


class LocalJob(JobHandle):
    """A job run by the local executor. ``process``: the controller's Popen when this process
    started it (a re-attached or unpickled handle follows the pid instead)."""

    executor = "local"
    poll_s = 0.2
    poll_cap_s = 0.2

    def __init__(
        self,
        run_dir: str | os.PathLike,
        job_id: str,
        *,
        num_tasks: int = 1,
        submitted_at: float | None = None,
        partition: str | None = None,
        process: subprocess.Popen | None = None,
    ) -> None:
        super().__init__(run_dir, job_id, num_tasks=num_tasks, submitted_at=submitted_at, partition=partition)
        self._process = process

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_process"] = None  # a Popen does not cross processes; the pid does
        return state

    # ------------------------------------------------------------------ processes

    def _controller_alive(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        try:
            with open(f"/proc/{self.job_id}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{self.job_id}/stat") as fh:
                zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return False
        return b"ltssl.launch._local_controller" in cmdline and not zombie

    def _running(self) -> bool:
        """The controller, or any task of the job (its process group), still runs."""
        return self._controller_alive() or local_exec.process_group_alive(int(self.job_id))

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        if self._was_cancelled() and not self._succeeded():
            return "CANCELLED"
        if self._running() and not all(self._read_result(t) is not None for t in range(self.num_tasks)):
            return "RUNNING"  # (every task has written its result: the processes are only exiting)
        outcome = self._read_result(0)
        if outcome is not None:
            return "COMPLETED" if outcome[0] == "success" else "FAILED"
        return "FAILED"

    @property
    def node_list(self) -> str | None:
        return self.job_record().get("node_list") or os.uname().nodename

    def _final_result(self) -> tuple[str, Any] | None:
        return self._read_result(0)  # a local job is never requeued behind our back: errors are final

    def _has_ended(self) -> bool:
        return False  # (cancel() checks the processes itself)

    def _kill(self) -> None:
        pgid = int(self.job_id)  # the controller leads a session of its own: pgid == its pid
        if self._process is None and not self._controller_alive() and not local_exec.process_group_alive(pgid):
            return
        local_exec.kill_process_group(pgid, self._process)
