"""The checkpoint store of a run folder: the last two checkpoints, each verified before it is used.

``checkpoints/last.pt`` is the newest checkpoint and ``checkpoints/previous.pt`` the one before;
each has a sidecar ``<name>.sha256`` with the SHA-256 of its bytes. A checkpoint is the dict of
:meth:`ltssl.train.Job.state`, written with ``torch.save`` and read with
``torch.load(weights_only=True)``.

Saving moves ``last.pt`` (and its sidecar) to ``previous.pt``, then writes the new ``last.pt``
and its sidecar atomically (:mod:`ltssl.io`): whenever a save is cut short (a killed job, a full
disk), at least one complete checkpoint is left.

Loading takes ``last.pt`` if it is good, else ``previous.pt``. Good means: its digest matches the
sidecar (a file whose sidecar is missing, as after a save cut between the two writes, is judged by
the next two checks alone), ``torch.load`` reads it, and it holds :data:`REQUIRED_KEYS`. A file
found bad is moved aside to ``<name>.corrupt`` at the next save, never rotated into
``previous.pt``. When no file is good the job stops with one line (:class:`CorruptCheckpointError`),
or, with ``train.restart_on_corrupt_checkpoint: true``, says so in one line and starts over.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import torch

from ltssl.io import atomic_write, atomic_write_text

REQUIRED_KEYS = ("model", "optimizer", "schedule", "epoch", "step_in_epoch", "global_step", "weights", "rng")
NAMES = ("last.pt", "previous.pt")  # newest first


class CorruptCheckpointError(RuntimeError):
    """No checkpoint of the run folder can be used; one line naming the files, why, and the setting that starts over."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check(path: Path) -> tuple[dict | None, str]:
    """(state, "") if the checkpoint at ``path`` is good, else (None, why not) in a few words."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    sidecar = _sidecar(path)
    if sidecar.exists():
        expected = sidecar.read_text().strip()
        if hashlib.sha256(data).hexdigest() != expected:
            return None, f"content does not match {sidecar.name} ({len(data)} bytes: truncated or overwritten)"
    try:
        # map_location cpu: RNG states must stay CPU tensors; load_state_dict copies onto the model's device
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader error means the file is unusable
        return None, f"unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'})"
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
        return None, f"not a checkpoint (missing {', '.join(missing)})"
    return state, ""


class CheckpointStore:
    """Save and load a job's state in ``folder`` (rank 0 saves; every rank may load).

    ``restart_on_corrupt``: when checkpoints exist but none is good, start over (:meth:`load`
    returns None) instead of raising :class:`CorruptCheckpointError`.
    """

    def __init__(self, folder: str | Path, restart_on_corrupt: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / NAMES[0]
        self.previous = self.folder / NAMES[1]
        self.restart_on_corrupt = restart_on_corrupt
        self._bad: set[Path] = set()  # files load() found bad: moved aside at the next save

    def save(self, state: dict) -> None:
        """Write ``state`` as the new ``last.pt``; the old one becomes ``previous.pt``."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
        self.folder.mkdir(parents=True, exist_ok=True)
        for bad in sorted(self._bad):
            if bad.exists():
                os.replace(bad, bad.with_name(bad.name + ".corrupt"))
            _sidecar(bad).unlink(missing_ok=True)
        self._bad.clear()
        if self.path.exists():
            _sidecar(self.previous).unlink(missing_ok=True)
            os.replace(self.path, self.previous)
            if _sidecar(self.path).exists():
                os.replace(_sidecar(self.path), _sidecar(self.previous))
        atomic_write(self.path, lambda fh: fh.write(data))
        atomic_write_text(_sidecar(self.path), hashlib.sha256(data).hexdigest() + "\n")

    def load(self) -> dict | None:
        """The newest good state; None when there is no checkpoint (or none is good and starting over is allowed)."""
        reasons = {}
        for path in (self.path, self.previous):
            state, why = _check(path)
            if state is not None:
                if reasons:
                    self._say(f"{self._describe(reasons)}; resuming from {path.name}")
                return state
            reasons[path] = why
            if why != "missing":
                self._bad.add(path)
        if all(why == "missing" for why in reasons.values()):
            return None
        if self.restart_on_corrupt:
            self._say(f"{self._describe(reasons)}; no good checkpoint: starting over (train.restart_on_corrupt_checkpoint)")
            return None
        raise CorruptCheckpointError(f"{self._describe(reasons)}: no good checkpoint to resume from; "
                                     "set train.restart_on_corrupt_checkpoint=true to start this run over")

    def _describe(self, reasons: dict[Path, str]) -> str:
        return f"{self.folder}: " + "; ".join(f"{path.name} {why}" for path, why in reasons.items())

    @staticmethod
    def _say(line: str) -> None:
        print(f"ltssl: {line}", file=sys.stderr, flush=True)
