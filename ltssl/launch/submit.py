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
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from ltssl.config import DATA_PATH_KEYS, Config, save_config
from ltssl.launch import local as local_exec
from ltssl.launch import slurm as slurm_commands
from ltssl.launch.local import child_env
from ltssl.launch.errors import LaunchError
from ltssl.launch.handle import JobHandle
from ltssl.launch.job import DEFAULT_TARGET, REPO_ROOT, TrainJob, _locked_update_json
from ltssl.launch.local_job import LocalJob
from ltssl.launch.preflight import preflight as run_preflight
from ltssl.launch.preflight import tasks_per_node
from ltssl.launch.slurm_job import SlurmJob

__all__ = ["JobHandle", "LocalJob", "SlurmJob", "git_info", "make_executor", "submit"]


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """The commit of the code that submits (and runs) the job, and whether tracked files differ."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, env=child_env()
        )
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=child_env(),
        )
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}


def _absolute_paths(cfg: Config) -> Config:
    """The config with data paths made absolute, so the job does not depend on its working directory."""

    def absolute(value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().absolute())

    data = dataclasses.replace(cfg.data, **{key: absolute(getattr(cfg.data, key)) for key in DATA_PATH_KEYS})
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
    preflight: bool = True,
) -> JobHandle:
    """Preflight, then submit one training job whose outputs go to ``run_dir``.

    Args:
        cfg: the run's configuration; ``cfg.launch`` says where and how it runs.
        run_dir: the job's folder (created).
        target: ``"module:function"`` run in every task as ``function(cfg, run_dir, **target_kwargs)``
            (default ``ltssl.train:train``).
        target_kwargs: extra keyword arguments of the target.
        preflight: run :func:`ltssl.launch.preflight` first (a sweep that checked every trial
            before starting passes False: the trainer's name check imports torch).

    Returns:
        a :class:`SlurmJob` (``launch.partition`` set) or a :class:`LocalJob`.

    Raises:
        LaunchError: one line, nothing submitted, when preflight refuses or sbatch fails.
    """
    cfg = _absolute_paths(cfg)
    if preflight:
        run_preflight(cfg, check_names=target == DEFAULT_TARGET)
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    executor = make_executor(cfg, run_dir / "submitit")
    submitted_at = time.time()
    job_id, process = _submit_with_retries(executor, TrainJob(cfg, run_dir, target=target, target_kwargs=target_kwargs),
                                           run_dir / "submitit", slurm=cfg.launch.partition is not None)
    _record_submission(cfg, run_dir, job_id, submitted_at, target)
    common = dict(num_tasks=cfg.launch.nodes * tasks_per_node(cfg), submitted_at=submitted_at, partition=cfg.launch.partition)
    if cfg.launch.partition is not None:
        return SlurmJob(run_dir, job_id, controller_downtime_s=cfg.launch.controller_downtime_s, **common)
    return LocalJob(run_dir, job_id, process=process, **common)


#: What sbatch says when slurmctld is busy or its answer was lost: worth another try.
TRANSIENT_SBATCH_ERRORS = ("no message", "Socket timed out", "Zero Bytes were transmitted", "Unable to contact slurm controller",
                           "temporarily unavailable", "Slurm temporarily unable", "Connection refused", "Connection reset")
#: Seconds to wait before each further try of a transient sbatch failure.
SUBMIT_RETRY_WAITS_S = (5.0, 15.0, 45.0)


def _sbatch_message(error: Exception) -> str:
    """The last line sbatch wrote, or what is known when it wrote nothing (submitit's FailedJobError
    carries sbatch's stderr, and the exit status in its cause)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if lines:
        return lines[-1]
    cause = error.__cause__
    if isinstance(cause, subprocess.CalledProcessError):
        return f"sbatch exited with status {cause.returncode} and no message"
    return type(error).__name__


def _submit_with_retries(executor, job_fn, submitit_folder: Path, slurm: bool) -> tuple[str, Any]:
    """Submit ``job_fn``: (job id, the local process or None).

    A transient sbatch failure (:data:`TRANSIENT_SBATCH_ERRORS`: slurmctld restarting or swamped by
    a large sweep's submissions) is tried again after :data:`SUBMIT_RETRY_WAITS_S`; before each new
    try, a job that sbatch created although its answer was lost is looked for in the queue (by its
    batch script, which lies in this run's submitit folder) and taken instead of a second one.
    """
    waits = list(SUBMIT_RETRY_WAITS_S) if slurm else []
    while True:
        try:
            job = executor.submit(job_fn)
            return job.job_id, getattr(job, "_process", None)
        except Exception as error:  # sbatch refused (account, QoS, ...) or could not reach the controller
            message = _sbatch_message(error)
            if not waits or not any(text in message for text in TRANSIENT_SBATCH_ERRORS):
                raise LaunchError(f"submission failed: {message}") from None
        time.sleep(waits.pop(0))
        try:
            created = slurm_commands.jobs_submitted_from(submitit_folder)
        except LaunchError:
            created = []  # slurmctld still away: the next sbatch tries (and waits) again
        if created:
            _hand_over_pickle(executor.folder, created[-1])
            return created[-1], None


def _hand_over_pickle(folder: Path, job_id: str) -> None:
    """Give a job created by an unanswered sbatch its function: submitit pickles it to
    ``<uuid>.pkl`` before sbatch and renames it to the job's ``<id>_submitted.pkl`` only on
    sbatch's answer, while the job waits for that file (60 s) when it starts."""
    leftovers = sorted(Path(folder).glob("*.pkl"), key=lambda path: path.stat().st_mtime)
    leftovers = [path for path in leftovers if len(path.stem) == 32 and all(c in "0123456789abcdef" for c in path.stem)]
    if leftovers:
        submitit.core.utils.JobPaths(folder, job_id=job_id).move_temporary_file(leftovers[-1], "submitted_pickle")


def _record_submission(cfg: Config, run_dir: Path, job_id: str, submitted_at: float, target: str) -> None:
    """Write the new job into run_dir/job.json (keeping earlier submissions and attempts)."""
    record = dict(
        job_id=job_id,
        executor="slurm" if cfg.launch.partition is not None else "local",
        partition=cfg.launch.partition,
        num_tasks=cfg.launch.nodes * tasks_per_node(cfg),
        submitted=submitted_at,
        submitit_folder=str(run_dir / "submitit"),
        target=target,
        controller_downtime_s=cfg.launch.controller_downtime_s,
        **git_info(),
    )

    def merge(data: dict) -> dict:
        data.setdefault("submissions", []).append({"job_id": job_id, "submitted": submitted_at, "partition": cfg.launch.partition})
        data.update(record)
        data.pop("cancelled", None)
        data.pop("finished", None)
        return data

    _locked_update_json(run_dir / "job.json", merge)
