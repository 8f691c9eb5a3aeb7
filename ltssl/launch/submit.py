"""Submit one training job, locally or to Slurm, through submitit; follow, cancel, re-attach.

One code path for both: ``cfg.launch.partition`` set -> ``submitit.AutoExecutor`` on Slurm with
``nodes x tasks_per_node`` tasks (one per GPU, or ``launch.tasks_per_node`` CPU-DDP processes);
unset -> the same :class:`~ltssl.launch.job.TrainJob` through submitit's local executor (a
controller process in its own session, see :mod:`ltssl.launch.local`).

A job's folder ``run_dir`` holds::

    config.yaml       the resolved configuration (written before submission)
    job.json          job id, executor, partition, node list, git commit, attempts (atomic)
    submitit/         submitit's pickles and logs (<job_id>_<task>_log.out / .err)
    metrics.jsonl, checkpoints/, result.json   written by the trainer
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths, pickle_load

from ltssl.config import Config, save_config
from ltssl.launch import local as local_exec
from ltssl.launch import slurm
from ltssl.launch.errors import JobCancelledError, JobFailedError, LaunchError
from ltssl.launch.job import DEFAULT_TARGET, TrainJob, _locked_update_json, update_job_json
from ltssl.launch.preflight import preflight, tasks_per_node

REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """The commit of the code that submits (and runs) the job, and whether tracked files differ."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}


def _absolute_paths(cfg: Config) -> Config:
    """The config with data paths made absolute, so the job does not depend on its working directory."""

    def absolute(value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().absolute())

    data = dataclasses.replace(
        cfg.data,
        root=absolute(cfg.data.root),
        split_file=absolute(cfg.data.split_file),
        ood_root=absolute(cfg.data.ood_root),
        cache_dir=absolute(cfg.data.cache_dir),
    )
    return dataclasses.replace(cfg, data=data)


def make_executor(cfg: Config, folder: str | os.PathLike) -> submitit.AutoExecutor:
    """The submitit executor for ``cfg.launch``: Slurm when a partition is set, else local."""
    launch = cfg.launch
    common: dict[str, Any] = dict(
        name=f"ltssl-{Path(folder).parent.name}"[:64],
        timeout_min=launch.timeout_min,
        nodes=launch.nodes,
        tasks_per_node=tasks_per_node(cfg),
        cpus_per_task=launch.cpus_per_task,
        mem_gb=launch.mem_gb,
    )
    if launch.gpus_per_node > 0:
        common["gpus_per_node"] = launch.gpus_per_node
    if launch.partition is not None:
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=launch.max_num_timeout)
        slurm_params: dict[str, Any] = dict(
            slurm_partition=launch.partition,
            slurm_signal_delay_s=launch.signal_delay_s,
            # a task that dies ends the whole step: its DDP peers would otherwise wait on it
            slurm_srun_args=["--kill-on-bad-exit=1"],
            slurm_additional_parameters={"requeue": True} if launch.requeue_on_node_failure else {"no-requeue": True},
        )
        for key in ("account", "qos", "constraint"):
            if getattr(launch, key):
                slurm_params[f"slurm_{key}"] = getattr(launch, key)
        executor.update_parameters(**common, **slurm_params)
        return executor
    executor = submitit.AutoExecutor(folder, cluster="local", local_max_num_timeout=launch.max_num_timeout)
    # Same AutoExecutor, with the local executor whose jobs can be cancelled from a Ray worker.
    executor._executor = local_exec.LocalExecutor(executor.folder, max_num_timeout=launch.max_num_timeout)
    executor.parameters = executor._executor.parameters
    executor.update_parameters(**common)
    executor._executor.parameters["signal_delay_s"] = launch.signal_delay_s
    return executor


def submit(
    cfg: Config,
    run_dir: str | os.PathLike,
    *,
    target: str = DEFAULT_TARGET,
    target_kwargs: dict | None = None,
) -> JobHandle:
    """Preflight, then submit one training job whose outputs go to ``run_dir``.

    Args:
        cfg: the run's configuration; ``cfg.launch`` says where and how it runs.
        run_dir: the job's folder (created).
        target: ``"module:function"`` run in every task as ``function(cfg, run_dir, **target_kwargs)``
            (default ``ltssl.train:train``).
        target_kwargs: extra keyword arguments of the target.

    Raises:
        LaunchError: one line, nothing submitted, when preflight refuses or sbatch fails.
    """
    cfg = _absolute_paths(cfg)
    preflight(cfg, check_names=target == DEFAULT_TARGET)
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    folder = run_dir / "submitit"
    executor = make_executor(cfg, folder)
    job_fn = TrainJob(cfg, run_dir, target=target, target_kwargs=target_kwargs)
    submitted_at = time.time()
    try:
        job = executor.submit(job_fn)
    except Exception as error:  # sbatch refused (account, QoS, ...) or could not start the controller
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise LaunchError(f"submission failed: {lines[-1] if lines else type(error).__name__}") from None
    kind = "slurm" if cfg.launch.partition is not None else "local"
    ntasks = cfg.launch.nodes * tasks_per_node(cfg)
    record = dict(
        job_id=job.job_id,
        executor=kind,
        partition=cfg.launch.partition,
        num_tasks=ntasks,
        submitted=submitted_at,
        submitit_folder=str(folder),
        target=target,
        **git_info(),
    )

    def merge(data: dict) -> dict:
        data.setdefault("submissions", []).append({"job_id": job.job_id, "submitted": submitted_at, "partition": cfg.launch.partition})
        data.update(record)
        data.pop("cancelled", None)
        data.pop("finished", None)
        return data

    _locked_update_json(run_dir / "job.json", merge)
    return JobHandle(
        run_dir,
        job.job_id,
        executor=kind,
        num_tasks=ntasks,
        submitted_at=submitted_at,
        partition=cfg.launch.partition,
        submitit_job=job,
    )


class JobHandle:
    """A submitted training job: its state, its rank-0 result, cancellation.

    Attributes:
        job_id: Slurm's job id, or the local controller's pid.
        run_dir: the job's folder.
        executor: ``"slurm"`` or ``"local"``.
        partition: the Slurm partition, None for local jobs.
        num_tasks: processes of the job (nodes x tasks per node).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        job_id: str,
        *,
        executor: str,
        num_tasks: int = 1,
        submitted_at: float | None = None,
        partition: str | None = None,
        submitit_job: submitit.Job | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.job_id = str(job_id)
        self.executor = executor
        self.num_tasks = num_tasks
        self.partition = partition
        self.submitted_at = submitted_at if submitted_at is not None else 0.0
        self._submitit_job = submitit_job
        self._process = getattr(submitit_job, "_process", None) if executor == "local" else None
        self._cancelled = False
        self._node_list: str | None = None

    # ------------------------------------------------------------------ re-attaching

    @classmethod
    def attach(cls, run_dir: str | os.PathLike) -> JobHandle:
        """The handle of the job last submitted into ``run_dir`` (from its job.json).

        Works from another process (a restarted sweep driver): Slurm jobs are followed through
        squeue/sacct, local jobs through their controller's pid.
        """
        path = Path(run_dir) / "job.json"
        if not path.is_file():
            raise LaunchError(f"{path} does not exist: nothing was submitted into {run_dir}")
        data = json.loads(path.read_text())
        return cls(
            run_dir,
            data["job_id"],
            executor=data.get("executor", "slurm"),
            num_tasks=int(data.get("num_tasks", 1)),
            submitted_at=float(data.get("submitted", 0.0)),
            partition=data.get("partition"),
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_process"] = None  # a Popen does not cross processes; the pid does
        state["_submitit_job"] = None
        return state

    def __repr__(self) -> str:
        return f"JobHandle(job_id={self.job_id!r}, executor={self.executor!r}, run_dir='{self.run_dir}')"

    # ------------------------------------------------------------------ paths and records

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

    @property
    def node_list(self) -> str | None:
        """The node(s) the job runs or ran on; None while pending."""
        if self.executor == "local":
            return self.job_record().get("node_list") or os.uname().nodename
        if self._node_list is None:
            _, nodes = slurm.job_state(self.job_id)
            self._node_list = nodes or self.job_record().get("node_list")
        return self._node_list

    # ------------------------------------------------------------------ state

    def _was_cancelled(self) -> bool:
        return self._cancelled or "cancelled" in self.job_record()

    def _read_result(self, task: int) -> tuple[str, Any] | None:
        """("success", value) / ("error", traceback) of a task, or None when it wrote nothing yet."""
        path = self.paths(task).result_pickle
        try:
            if path.stat().st_mtime < self.submitted_at - 1:
                return None  # an older job's file (job ids restart with a fresh cluster)
            return pickle_load(path)
        except (FileNotFoundError, EOFError):
            return None

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

    @property
    def state(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... (Slurm's names, also locally)."""
        if self.executor == "slurm":
            state, nodes = slurm.job_state(self.job_id)
            if nodes:
                self._node_list = nodes
            if state not in slurm.TERMINAL_STATES and self._cancelled and not self._succeeded():
                return "CANCELLED"
            return state
        if self._was_cancelled() and not self._succeeded():
            return "CANCELLED"
        if self._controller_alive() and not all(self._read_result(t) is not None for t in range(self.num_tasks)):
            return "RUNNING"  # (every task has written its result: the controller is only exiting)
        outcome = self._read_result(0)
        if outcome is not None:
            return "COMPLETED" if outcome[0] == "success" else "FAILED"
        return "FAILED"

    def _final_result(self) -> tuple[str, Any] | None:
        """Rank 0's outcome when it is final: a success, or (locally) an error.

        On Slurm an error is final only once the job has ended: after a node failure the surviving
        rank of the interrupted attempt writes an error result, then Slurm requeues the job and the
        next attempt replaces it, so an error read while the job is not in a terminal state may be
        stale (:meth:`result` reads it again once the job has ended).
        """
        outcome = self._read_result(0)
        if outcome is not None and outcome[0] == "error" and self.executor == "slurm":
            return None
        return outcome

    def _succeeded(self) -> bool:
        outcome = self._read_result(0)
        return outcome is not None and outcome[0] == "success"

    def done(self) -> bool:
        """Whether the job has ended (or its rank-0 result is already there)."""
        if self._final_result() is not None:
            return True
        return self.state in slurm.TERMINAL_STATES

    # ------------------------------------------------------------------ results

    def result(self, timeout: float | None = None, poll_s: float | None = None) -> Any:
        """Wait for the job and return rank 0's result.

        Raises:
            JobCancelledError: "job <id> was cancelled" (at once; no wait for files that will not come).
            JobFailedError: the job raised (message + remote traceback) or Slurm ended it
                (FAILED, TIMEOUT, NODE_FAIL, ...; message + the tail of its stderr).
            LaunchError: still not done after ``timeout`` seconds.
        """
        poll_s = poll_s if poll_s is not None else (1.0 if self.executor == "slurm" else 0.2)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self._final_result()
            if outcome is not None and outcome[0] == "success":  # (it may have finished as it was cancelled)
                return outcome[1]
            if self._was_cancelled():
                raise JobCancelledError(f"job {self.job_id} was cancelled")
            if outcome is not None:
                return self._unwrap(outcome, task=0)
            state = self.state
            if state in slurm.TERMINAL_STATES:
                return self._result_after_end(state)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"job {self.job_id} is still {state} after {timeout:g} s")
            time.sleep(poll_s)

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

    def _first_task_error(self) -> tuple[int, str] | None:
        errors = self._task_errors()
        return (errors[0][1], errors[0][2]) if errors else None

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

    def _unwrap(self, outcome: tuple[str, Any], task: int) -> Any:
        kind, value = outcome
        if kind == "success":
            return value
        raise self._failure()

    def _result_after_end(self, state: str) -> Any:
        """The job has ended: rank 0's result if it comes within a few seconds, else the reason."""
        if state == "CANCELLED":
            raise JobCancelledError(f"job {self.job_id} was cancelled")
        # A network file system may show the result file a little after the job ends.
        wait_until = time.monotonic() + (5.0 if state == "COMPLETED" else 2.0)
        while True:
            outcome = self._read_result(0)
            if outcome is not None:
                return self._unwrap(outcome, task=0)
            if self._task_errors():
                raise self._failure()
            if time.monotonic() > wait_until:
                break
            time.sleep(0.2)
        raise JobFailedError(f"job {self.job_id} ended {state} without a result; stderr of task 0:", self.log_tail(0))

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> str:
        """Block until the job ends (or ``timeout`` s pass); return its state. Never raises on failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll_s if self.executor == "slurm" else min(poll_s, 0.2))
        return self.state

    # ------------------------------------------------------------------ cancel

    def cancel(self) -> None:
        """End the job and all its processes now; later ``result()`` raises JobCancelledError.

        Slurm: ``scancel`` (rank 0 saves a checkpoint on the SIGTERM and every task exits at once).
        Local: SIGTERM to the job's process group, SIGKILL after 2 s for anything left (works from a
        Ray worker, where SIGINT is blocked). Returns within about 2 s. A job that has already
        ended is left as it is (its result stays readable).
        """
        if self._succeeded() or (self.executor == "slurm" and self.state in slurm.TERMINAL_STATES):
            return
        self._cancelled = True
        update_job_json(self.run_dir, cancelled=time.time())
        if self.executor == "slurm":
            slurm.cancel(self.job_id)
        else:
            self._kill_local()

    def _kill_local(self) -> None:
        pgid = int(self.job_id)  # the controller leads a session of its own: pgid == its pid
        if self._process is None and not self._controller_alive() and not local_exec.process_group_alive(pgid):
            return
        local_exec.kill_process_group(pgid, self._process)
