"""The files of a job's run folder, as the job's handle reads them.

``run_dir`` holds config.yaml, job.json, metrics.jsonl, checkpoints/, result.json and ``submitit/``,
where every task of the job writes its log (``<job_id>_<task>_log.out`` / ``.err``) and its outcome
(``<job_id>_<task>_result.pkl``: ``("success", value)`` or ``("error", traceback)``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths, pickle_load

from ltssl.launch.errors import JobCancelledError, JobFailedError

# What to do about a job that ended without a result, by the state it ended in.
END_HINTS = {
    "OUT_OF_MEMORY": "it used more memory than --mem allows: raise launch.mem_gb",
    "TIMEOUT": "it reached its time limit too often: raise launch.timeout_min or launch.max_num_timeout",
    "NODE_FAIL": "its node failed: resubmit it (with launch.requeue_on_node_failure it resumes by itself)",
}
MEMORY_KILL_MARK = "exceeded memory limit"  # slurmstepd: "StepId=<id>.0 exceeded memory limit (<used> > <limit>), being killed"


class RunFolder:
    """Reading one job's run folder: its logs, its tasks' outcomes, the error it failed with.

    The handle that inherits this sets ``run_dir`` (Path), ``job_id`` (str), ``num_tasks`` (int) and
    ``submitted_at`` (``time.time()`` of the submission, s).
    """

    run_dir: Path
    job_id: str
    num_tasks: int
    submitted_at: float

    @property
    def folder(self) -> Path:
        """submitit's folder: pickles and logs."""
        return self.run_dir / "submitit"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def paths(self, task: int = 0) -> JobPaths:
        """submitit's paths (stdout, stderr, result_pickle, ...) of one task."""
        return JobPaths(self.folder, job_id=self.job_id, task_id=task)

    def job_record(self) -> dict:
        """run_dir/job.json as a dict (empty when missing)."""
        try:
            return json.loads((self.run_dir / "job.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def log_tail(self, task: int = 0, lines: int = 40) -> str:
        """The last ``lines`` lines of one task's stderr (falls back to stdout)."""
        for path in (self.paths(task).stderr, self.paths(task).stdout):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()
                if text:
                    return "\n".join(text[-lines:])
        return f"(no log at {self.paths(task).stderr})"

    def _read_result(self, task: int) -> tuple[str, Any] | None:
        """("success", value) / ("error", traceback) of a task, or None when it wrote nothing yet."""
        path = self.paths(task).result_pickle
        try:
            if path.stat().st_mtime < self.submitted_at - 1:
                return None  # an older job's file (job ids restart with a fresh cluster)
            return pickle_load(path)
        except (FileNotFoundError, EOFError):
            return None

    def _task_errors(self) -> list[tuple[float, int, str]]:
        """(time written, task, traceback) of every task that wrote an error, earliest first."""
        errors = []
        for task in range(self.num_tasks):
            outcome = self._read_result(task)
            if outcome is not None and outcome[0] == "error":
                try:
                    written = self.paths(task).result_pickle.stat().st_mtime
                except FileNotFoundError:
                    continue
                errors.append((written, task, outcome[1]))
        return sorted(errors)

    def _failure(self, note: str = "") -> JobFailedError:
        """The job's error: the traceback of the task that failed first (its DDP peers' errors,
        e.g. gloo's "connection closed", are consequences and only listed)."""
        errors = self._task_errors()
        if not errors:
            return JobFailedError(f"job {self.job_id} failed{note}; stderr of task 0:", self.log_tail(0))
        _, task, trace = errors[0]
        others = [f"task {t} failed after it: {tb.strip().splitlines()[-1] if tb.strip() else '?'}" for _, t, tb in errors[1:]]
        summary = f"job {self.job_id} failed (task {task}{note}):"
        return JobFailedError(summary, trace + ("\n" + "\n".join(others) if others else ""))

    def _unwrap(self, outcome: tuple[str, Any]) -> Any:
        kind, value = outcome
        if kind == "success":
            return value
        raise self._failure()

    def _memory_kill(self) -> str | None:
        """Slurm's line saying it killed the job for exceeding ``--mem``, from the tasks' logs, or None.

        With cgroups Slurm ends such a job OUT_OF_MEMORY; where memory is enforced by sampling
        (``JobAcctGatherParams=OverMemoryKill``) it ends FAILED, and only this line tells why.
        """
        for task in range(self.num_tasks):
            for line in reversed(self.log_tail(task, lines=200).splitlines()):
                if MEMORY_KILL_MARK in line:
                    return line.split("error:", 1)[-1].strip()
        return None

    def _result_after_end(self, state: str) -> Any:
        """The job has ended: rank 0's result if it comes within a few seconds, else the reason."""
        if state == "CANCELLED":
            raise JobCancelledError(f"job {self.job_id} was cancelled")
        # A network file system may show the result file a little after the job ends.
        wait_until = time.monotonic() + (5.0 if state == "COMPLETED" else 2.0)
        while True:
            outcome = self._read_result(0)
            if outcome is not None and outcome[0] == "success":
                return outcome[1]
            if outcome is not None or self._task_errors() or time.monotonic() > wait_until:
                break
            time.sleep(0.2)
        memory = self._memory_kill() if state != "COMPLETED" else None
        if memory is not None or state == "OUT_OF_MEMORY":
            detail = f"{memory}; " if memory else ""
            raise JobFailedError(f"job {self.job_id} ended OUT_OF_MEMORY ({detail}{END_HINTS['OUT_OF_MEMORY']}); stderr of task 0:", self.log_tail(0))
        if outcome is not None or self._task_errors():
            raise self._failure()
        hint = f" ({END_HINTS[state]})" if state in END_HINTS else ""
        raise JobFailedError(f"job {self.job_id} ended {state} without a result{hint}; stderr of task 0:", self.log_tail(0))
