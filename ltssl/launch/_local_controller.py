"""Entry point of a local job's controller: reset inherited signal state, then run submitit's.

A process started from a Ray worker inherits a blocked SIGINT (and possibly ignored SIGINT/SIGTERM);
the job must react to both, so the mask and the dispositions are reset before the controller starts.

The controller also behaves like Slurm when one task ends early: a task that exits non-zero (an
error, like ``srun --kill-on-bad-exit``) or asks to be requeued (exit 144 after the time-limit
signal, like ``scontrol requeue``) ends the others (SIGTERM, SIGKILL 5 s later), instead of letting
its DDP peers wait on it until their collectives time out.
"""

import os
import signal
import sys
import time
from pathlib import Path

from submitit.core import utils
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, Controller, LocalJobEnvironment


def _reset_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


KILL_AFTER_S = 5.0


class JobController(Controller):
    """submitit's local Controller that ends a job's other tasks when one ends early, and
    recognises a requeue by the rewritten job pickle (see the module docstring)."""

    def wait(self, freq: int = 24):
        timeout = freq * self.timeout_s
        almost_timeout = freq * (self.timeout_s - self.signal_delay_s)
        ending_since = None
        for step in range(timeout):
            exit_codes = [t.poll() for t in self.tasks]
            if all(e is not None for e in exit_codes):
                return exit_codes
            if ending_since is None and any(e not in (None, 0) for e in exit_codes):
                ending_since = time.monotonic()
                self._forward_signal(signal.SIGTERM)
            elif ending_since is not None and time.monotonic() - ending_since > KILL_AFTER_S:
                self._forward_signal(signal.SIGKILL)
            if step == almost_timeout:
                self._forward_signal(LocalJobEnvironment._usr_sig())
            time.sleep(1.0 / freq)
        return [t.poll() for t in self.tasks]

    def run(self, max_retry: int = 6) -> None:
        """submitit's loop, but a requeue is also recognised by the job's pickle having been
        rewritten during the attempt (rank 0's checkpoint), whatever rank 0's exit code: a
        rank 0 killed while leaving (e.g. stuck in DDP teardown) must still be requeued."""
        submitted = utils.JobPaths(self.folder, self.pid).submitted_pickle
        for _ in range(max_retry):
            try:
                started = time.time()
                self.start_tasks()
                exit_codes = self.wait()
                rewritten = submitted.exists() and submitted.stat().st_mtime > started
                if not (any(e == LOCAL_REQUEUE_RETURN_CODE for e in exit_codes) or rewritten):
                    break
            finally:
                self.kill_tasks()


if __name__ == "__main__":
    _reset_signals()
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ltssl.launch._local_controller <submitit_folder>")
    # submitit's default of 6 restarts would end a long local run that requeues itself more often
    # than that (each time limit): allow what the executor's max_num_timeout allows.
    JobController(Path(sys.argv[1])).run(max_retry=int(os.environ.get("LTSSL_LOCAL_MAX_RETRY", "6")))
