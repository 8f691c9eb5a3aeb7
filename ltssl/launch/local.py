"""submitit's local executor, made cancellable from anywhere (Ray workers included).

submitit's ``LocalExecutor`` starts a controller process (``submitit.local._local``) that runs the
tasks; ``LocalJob.cancel()`` sends it SIGINT. Inside a Ray worker SIGINT is blocked, and a blocked or
ignored signal stays so across ``fork``/``exec``: the controller and its tasks never see it. Here the
controller

* starts in a session (process group) of its own, so cancel can SIGKILL the whole job, tasks and
  data-loader workers included, without touching the caller's group;
* runs through :mod:`ltssl.launch._local_controller`, which unblocks every signal and restores the
  default SIGINT/SIGTERM behaviour before handing over to submitit's controller.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from submitit.local import local as submitit_local


def child_env() -> dict[str, str]:
    """A copy of this process's environment, to pass as ``env=`` to every child process.

    Without ``env=``, subprocess execs the child (after ``vfork``) with libc's live ``environ``
    array; another thread that sets a variable at that moment (Ray does while it starts) makes libc
    reallocate and free that array, and the exec fails with ``OSError: [Errno 14] Bad address``
    naming the executable. An explicit copy is built by the calling thread and cannot be freed
    under it.
    """
    return dict(os.environ)


#: Thread-count variables that local jobs inherit (PyTorch's and MKL's CPU ops; not numba's: FFCV's
#: loader sets numba's thread count to its workers, which an environment cap would make an error).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def share_cpus_among_jobs(jobs_at_once: int) -> None:
    """Give each of ``jobs_at_once`` local jobs an equal share of this machine's CPUs as threads.

    Set in this process's environment, which every local job inherits; call it before any thread
    starts (see :func:`child_env`). A variable the user set is kept. Without it every job starts one
    PyTorch thread per core, and jobs side by side spin against each other in OpenMP: two digits
    jobs on 2 cores ran at 50 images/s each, against 850 with one thread each (measured). The
    user's value is passed on as written (OpenMP also takes lists such as ``4,2``).
    """
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs_at_once))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))


def start_controller(
    folder: Path,
    command: str,
    tasks_per_node: int = 1,
    cuda_devices: str = "",
    timeout_min: float = 5.0,
    signal_delay_s: int = 30,
    stderr_to_stdout: bool = False,
    max_retry: int = 6,
) -> subprocess.Popen:
    """submitit's ``start_controller``, in a new session and through the signal-resetting wrapper."""
    env = child_env()
    env.update(
        SUBMITIT_LOCAL_NTASKS=str(tasks_per_node),
        SUBMITIT_LOCAL_COMMAND=command,
        SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * timeout_min)),
        SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(signal_delay_s)),
        SUBMITIT_LOCAL_NODEID="0",
        SUBMITIT_LOCAL_JOB_NUM_NODES="1",
        SUBMITIT_STDERR_TO_STDOUT="1" if stderr_to_stdout else "",
        SUBMITIT_EXECUTOR="local",
        CUDA_VISIBLE_DEVICES=cuda_devices,
        SUBMITIT_LOCAL_WITH_SHELL="",
        LTSSL_LOCAL_MAX_RETRY=str(max_retry),
    )
    # The controller outlives this call: LocalJob polls it and cancel() ends its process group.
    return subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "ltssl.launch._local_controller", str(folder)],
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


class LocalExecutor(submitit_local.LocalExecutor):
    """submitit's LocalExecutor with :func:`start_controller` above (new session, signals reset)."""

    def _submit_command(self, command: str) -> submitit_local.LocalJob:
        ntasks = self.parameters.get("tasks_per_node", 1)
        n_gpus = self.parameters.get("gpus_per_node", 0)
        visible_gpus = self.parameters.get("visible_gpus", ())
        gpus = range(n_gpus) if visible_gpus == () else visible_gpus[:n_gpus]
        process = start_controller(
            folder=self.folder,
            command=command,
            tasks_per_node=ntasks,
            cuda_devices=",".join(str(k) for k in gpus),
            timeout_min=self.parameters.get("timeout_min", 2.0),
            signal_delay_s=self.parameters.get("signal_delay_s", 30),
            stderr_to_stdout=self.parameters.get("stderr_to_stdout", False),
            max_retry=self.max_num_timeout + 1,
        )
        return submitit_local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def process_group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still exists (zombies excluded)."""
    return bool(process_group_members(pgid))


def process_group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes whose process group is ``pgid`` (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid pgrp ...", comm may contain spaces and ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def kill_process_group(pgid: int, process: subprocess.Popen | None = None, grace_s: float = 2.0) -> None:
    """SIGTERM the group (the job checkpoints and exits), then SIGKILL whatever is left after ``grace_s``.

    SIGTERM rather than SIGINT: the job's tasks handle SIGTERM (rank 0 saves a checkpoint, all exit)
    and the controller forwards it; SIGKILL ends anything that blocks or ignores it.
    """
    def signal_group(sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process is not None:
            process.poll()  # reap the controller so it does not linger as a zombie
        if not process_group_alive(pgid):
            break
        time.sleep(0.05)
    signal_group(signal.SIGKILL)
    if process is not None:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
