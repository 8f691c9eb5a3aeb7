"""The checkpoint store of a run folder: ``checkpoints/last.pt``, written atomically.

A checkpoint is the dict of :meth:`ltssl.train.Job.state`, saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ltssl.io import atomic_torch_save


class CheckpointStore:
    """Save and load the job's state in ``folder`` (rank 0 saves; every rank may load)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / "last.pt"

    def save(self, state: dict) -> None:
        atomic_torch_save(self.path, state)

    def load(self) -> dict | None:
        """The saved state, or None when there is no checkpoint yet."""
        if not self.path.exists():
            return None
        # map_location cpu: RNG states must stay CPU tensors; load_state_dict copies onto the model's device
        return torch.load(self.path, map_location="cpu", weights_only=True)
