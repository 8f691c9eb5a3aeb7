"""Checkpoint signals (SIGUSR2, SIGTERM) handled only at step boundaries.

Slurm (through submitit) sends SIGUSR2 before a time limit or preemption and SIGTERM when it
cancels; their Python handlers save a checkpoint (:func:`ltssl.train.checkpoint_now`) and end the
job. A checkpoint is only consistent between two steps: in the middle of a SAM step the weights
are the perturbed ``w + e_w``. So during training the handlers run only at boundaries, the points
where the training loop calls :meth:`BoundaryGate.open` (after every step, between evaluation
batches, after data preparation).

Two layers make sure of it:

- the signals stay blocked in the training thread (threads started during training inherit the
  block), and :meth:`BoundaryGate.open` unblocks them for an instant, which is when CPython runs
  a pending handler;
- a thread that existed before training (OpenBLAS's pool, started when numpy is imported) does not
  block them and can still take a process-directed signal, after which CPython runs the handler
  in the main thread between two bytecodes of a step. So for the duration of training each
  handler is wrapped: a signal that arrives between boundaries is held and handed to the original
  handler at the next boundary.

Use::

    with held_at_boundaries() as gate:
        for batch in batches:
            step(batch)
            gate.open()
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

CHECKPOINT_SIGNALS = {signal.SIGUSR2, signal.SIGTERM}


class BoundaryGate:
    """Hold SIGUSR2/SIGTERM handlers until a step boundary.

    While installed, each signal's Python handler is replaced by one that calls the original at
    once if the caller is at a boundary, and otherwise queues the signal; :meth:`open` (called at
    every boundary) delivers the queue.
    """

    def __init__(self):
        self.originals: dict[int, Callable] = {}
        self.pending: list[int] = []
        self.at_boundary = False

    def install(self) -> None:
        """Wrap the current handlers (main thread only: ``signal.signal`` works only there; the sigmask still applies)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in CHECKPOINT_SIGNALS:
            original = signal.getsignal(sig)
            if callable(original):
                self.originals[sig] = original
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:
        if self.at_boundary:
            self.originals[signum](signum, frame)
        elif signum not in self.pending:
            self.pending.append(signum)

    def open(self) -> None:
        """A consistent point: run held handlers and any signal pending on the thread's mask."""
        self.at_boundary = True
        try:
            while self.pending:
                signum = self.pending.pop(0)
                self.originals[signum](signum, None)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CHECKPOINT_SIGNALS)  # CPython runs pending handlers here
            signal.pthread_sigmask(signal.SIG_BLOCK, CHECKPOINT_SIGNALS)
        finally:
            self.at_boundary = False

    def between(self, batches) -> Iterator:
        """Yield from ``batches``, opening the gate after each one (evaluation passes)."""
        for batch in batches:
            yield batch
            self.open()

    def uninstall(self) -> None:
        """Restore the handlers; a signal still held is raised again for them (the caller's mask decides when)."""
        for sig, original in self.originals.items():
            signal.signal(sig, original)
        held, self.pending, self.originals = self.pending, [], {}
        for signum in held:
            signal.raise_signal(signum)


@contextlib.contextmanager
def held_at_boundaries() -> Iterator[BoundaryGate]:
    """Block the checkpoint signals in this thread and wrap their handlers; restore both on exit."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHECKPOINT_SIGNALS)
    gate = BoundaryGate()
    gate.install()
    try:
        yield gate
    finally:
        gate.uninstall()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
