"""The driver's watch on its own Ray: the GCS server and the raylet it started on the login node.

If either dies under a running sweep (killed by an administrator, the OOM killer, a login-node
clean-up), nothing of the sweep is lost: its Slurm jobs run on, and ``--resume`` re-attaches to
them. What must not happen is what Ray does by itself: with the GCS gone the driver
blocks in its next Ray call (a trial's placement group), then Ray's core worker ends the process
with its own error once its GCS reconnection timeout runs out. So the driver watches both
processes: on a loss it marks the sweep detached (no job is cancelled), stops its loop, records
nothing more, and exits with one line (:data:`RAY_LOST_EXIT`).
"""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ray

from ltssl.sweep.ledger import DETACH_MARKER

#: Exit status of a driver whose Ray died (EX_TEMPFAIL: run it again, with --resume).
RAY_LOST_EXIT = 75

#: Ray's process names -> how the message names them.
WATCHED = {"gcs_server": "Ray's GCS server", "raylet": "Ray's raylet"}


def _without_raylet_dump(print_to_stdstream):
    """Ray's printer of the errors Ray publishes to the driver, less the raylet's death notice: that
    notice (published by Ray's agent the moment the raylet dies, before this watch can see it)
    carries the raylet's last log lines (state dumps); the driver's one line says what the
    user needs."""

    def printer(data, *args, **kwargs):
        if not any(str(line).startswith("Raylet is terminated") for line in data.get("lines", ())):
            print_to_stdstream(data, *args, **kwargs)

    printer.without_raylet_dump = True
    return printer


class RayWatch:
    """Polls the GCS server and raylet this driver started; :attr:`lost` says which one died, and how."""

    def __init__(self, output_dir: Path, poll_s: float = 0.2):
        # The processes ray.init started for this driver (a private attribute: Ray has no public
        # handle on them); Popen objects, so an exit is seen at once and never confused with
        # another process that reuses the pid.
        node = ray._private.worker._global_node
        self.processes: dict[str, subprocess.Popen] = {
            name: node.all_processes[name][0].process for name in WATCHED if node.all_processes.get(name)
        }
        self.output_dir = output_dir
        self.poll_s = poll_s
        # The driver's thread that prints Ray's published errors looks this module function up at
        # every message (a private name: Ray has no switch for it).
        worker_module = ray._private.worker
        if not hasattr(worker_module.print_to_stdstream, "without_raylet_dump"):  # once per process
            worker_module.print_to_stdstream = _without_raylet_dump(worker_module.print_to_stdstream)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-watch", daemon=True)

    def check(self) -> str | None:
        """The loss, if a watched process has exited (also called by the driver's loop before
        each Ray call and before it records a trial's error)."""
        if self.lost is None:
            for name, proc in self.processes.items():
                code = proc.poll()
                if code is not None:
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    self.lost = f"{WATCHED[name]} (pid {proc.pid}) died ({how})"
                    (self.output_dir / DETACH_MARKER).write_text("ray lost")  # trials leave their jobs running
                    break
        return self.lost

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.check():
                # Stop the loop through the driver's SIGTERM handler (run.fit): it raises in the main
                # thread, which may be waiting on the dead GCS.
                _thread.interrupt_main(signal.SIGTERM)
                return

    def abandon(self) -> None:
        """End this driver now: Ray's remaining processes killed, one line, :data:`RAY_LOST_EXIT`.

        ``ray.shutdown()`` would wait on the dead GCS until Ray's core worker ends the process with
        its own error, so the driver kills what Ray started itself and exits without it.
        """
        node = ray._private.worker._global_node
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        sys.stdout.flush()
        print(f"sweep: {self.lost}: the driver stops, the jobs keep running; "
              f"continue with --resume --output-dir {self.output_dir} (it re-attaches to them)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(RAY_LOST_EXIT)
