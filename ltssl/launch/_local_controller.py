"""Entry point of a local job's controller: reset inherited signal state, then run submitit's.

A process started from a Ray worker inherits a blocked SIGINT (and possibly ignored SIGINT/SIGTERM);
the job must react to both, so the mask and the dispositions are reset before anything else.
"""

import signal
import sys
from pathlib import Path


def _reset_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    _reset_signals()
    from submitit.local.local import Controller

    if len(sys.argv) != 2:
        sys.exit("usage: python -m ltssl.launch._local_controller <submitit_folder>")
    Controller(Path(sys.argv[1])).run()
