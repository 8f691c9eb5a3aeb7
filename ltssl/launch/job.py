"""The callable that runs inside every task of a training job, locally or on Slurm.

:class:`TrainJob` is a ``submitit.helpers.Checkpointable`` (the pattern of DINO's
``run_with_submitit``): when Slurm signals the job before its time limit (``--signal=USR2@delay``) or
a preemption is simulated with ``scancel --signal=USR2``, submitit calls :meth:`TrainJob.checkpoint`
on rank 0, which saves the running trainer's state (``checkpoint_now()`` of the target's module) and
returns a *fresh* ``TrainJob``; submitit pickles it and requeues the job, and the requeued attempt
resumes from ``run_dir/checkpoints/last.pt`` (the trainer resumes whenever that file exists).

SIGTERM, which Slurm sends on ``scontrol requeue``, on preemption and on ``scancel`` (``KillWait``
seconds before SIGKILL), makes rank 0 save a checkpoint too and every rank exit at once: an external
requeue loses no step and a cancelled job's processes are gone within about a second instead of
``KillWait``.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import submitit

from ltssl.config import Config
from ltssl.io import atomic_write_text

DEFAULT_TARGET = "ltssl.train:train"  # the training entry point every job runs unless told otherwise
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: git commit, default sweep, runs/

# Preemption signal of submitit (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise).
PREEMPT_SIGNAL = submitit.JobEnvironment._usr_sig()
LOCAL_REQUEUE_RETURN_CODE = 144  # submitit.local.local: "requeue me" to the local controller


def resolve_target(target: str) -> tuple[Callable[..., Any], Callable[[], bool] | None]:
    """``"package.module:function"`` -> (function, the module's ``checkpoint_now`` or None)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    return fn, getattr(module, "checkpoint_now", None)


def _locked_update_json(path: Path, update: Callable[[dict], dict]) -> dict:
    """Read-modify-write ``path`` (JSON) under an flock, written atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:
            data = {}
        data = update(data)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return data


def update_job_json(run_dir: str | os.PathLike, **fields: Any) -> dict:
    """Merge ``fields`` into ``run_dir/job.json`` (atomic, safe against the job writing it too)."""

    def merge(data: dict) -> dict:
        data.update(fields)
        return data

    return _locked_update_json(Path(run_dir) / "job.json", merge)


class TrainJob(submitit.helpers.Checkpointable):
    """One training job: calls ``target(cfg, run_dir, **target_kwargs)`` in every task.

    Args:
        cfg: the resolved configuration.
        run_dir: the job's folder (config, metrics, checkpoints, result, job.json, submitit logs).
        target: ``"module:function"``; the function takes ``(cfg, run_dir, **target_kwargs)`` and
            returns the result dict on rank 0. Its module's ``checkpoint_now() -> bool`` (if any) is
            called on preemption. Default: ``ltssl.train:train``.
        target_kwargs: extra keyword arguments of the target (tests use them).
        attempt: 0 for the first submission; +1 for each requeue through :meth:`checkpoint`.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | os.PathLike,
        target: str = DEFAULT_TARGET,
        target_kwargs: dict | None = None,
        attempt: int = 0,
    ) -> None:
        self.cfg = cfg
        self.run_dir = str(Path(run_dir).absolute())
        self.target = target
        self.target_kwargs = dict(target_kwargs or {})
        self.attempt = attempt
        self._checkpointed = False
        self._requeueing = False

    # ------------------------------------------------------------------ inside the job

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        rank = env.global_rank
        self._remove_stale_result(env)
        restart = self._restart_index()
        if env.num_tasks > 1:
            self._export_distributed_env(env, restart)
        if rank == 0:  # before importing the target (seconds for torch): job.json shows the start at once
            self._record_attempt(env, restart)
        fn, checkpoint_now = resolve_target(self.target)
        self._install_sigterm_handler(rank, checkpoint_now)
        result = fn(self.cfg, self.run_dir, **self.target_kwargs)
        if rank == 0:
            update_job_json(self.run_dir, finished=time.time())
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at the preemption/time-limit signal: save, then requeue."""
        saved = self._checkpoint_now()
        self._requeueing = True
        print(f"ltssl: preemption signal: checkpoint {'saved' if saved else 'not saved (no trainer running)'}; requeueing", flush=True)
        fresh = type(self)(self.cfg, self.run_dir, self.target, self.target_kwargs, self.attempt + 1)
        return submitit.helpers.DelayedSubmission(fresh)

    def _checkpoint_now(self) -> bool:
        if self._checkpointed:  # SIGTERM right after USR2: the state is already on disk
            return True
        _, checkpoint_now = resolve_target(self.target)
        # No re-entry: a SIGTERM (scontrol requeue follows USR2) must not start a second save mid-save.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, PREEMPT_SIGNAL})
        try:
            saved = bool(checkpoint_now()) if checkpoint_now is not None else False
            self._checkpointed = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return saved

    def _install_sigterm_handler(self, rank: int, checkpoint_now: Callable[[], bool] | None) -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            if rank == 0:
                try:
                    saved = self._checkpoint_now()
                    print(f"ltssl: SIGTERM: checkpoint {'saved' if saved else 'not saved'}; exiting", flush=True)
                except Exception as error:  # the process is ending: say why the save failed, then go
                    print(f"ltssl: SIGTERM: checkpoint failed: {error!r}; exiting", flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # A local job's controller restarts the job only if a task exits with submitit's requeue
            # code: a SIGTERM that arrives while rank 0 is leaving for a requeue must keep that code.
            requeue = self._requeueing and os.environ.get("SUBMITIT_EXECUTOR") == "local"
            # os._exit: no DDP teardown that could wait on ranks that are already gone
            os._exit(LOCAL_REQUEUE_RETURN_CODE if requeue else 128 + signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _restart_index(self) -> int:
        """Which attempt this is: Slurm's restart count (external requeues too) or our own count."""
        return max(int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), self.attempt)

    @staticmethod
    def _remove_stale_result(env: submitit.JobEnvironment) -> None:
        """A surviving rank of an interrupted attempt may have written an error result: drop it."""
        env.paths.result_pickle.unlink(missing_ok=True)

    @staticmethod
    def _export_distributed_env(env: submitit.JobEnvironment, restart: int) -> None:
        """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for ``init_process_group('env://')``.

        The port depends on the job id *and* the attempt, so a requeued job does not race the
        previous attempt's socket; every rank computes the same one.
        """
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        port = int(os.environ.get("LTSSL_MASTER_PORT", 0)) or random.Random(f"{env.job_id}-{restart}").randint(20000, 60000)
        dist_env.master_port = port
        # CUDA_VISIBLE_DEVICES is left alone: Slurm already restricts it; the trainer uses LOCAL_RANK.
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)

    def _record_attempt(self, env: submitit.JobEnvironment, restart: int) -> None:
        node_list = os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname()
        attempt = {
            "job_id": env.job_id,
            "restart": restart,
            "node_list": node_list,
            "hostname": socket.gethostname(),
            "started": time.time(),
            "num_tasks": env.num_tasks,
        }

        def merge(data: dict) -> dict:
            data.setdefault("attempts", []).append(attempt)
            data.update(job_id=env.job_id, node_list=node_list, started=data.get("started", attempt["started"]))
            return data

        _locked_update_json(Path(self.run_dir) / "job.json", merge)
