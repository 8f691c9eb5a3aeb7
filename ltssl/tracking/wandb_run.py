"""Weights & Biases: one W&B run per trial, continued by a requeued job.

Run id ``<sweep id>-<trial id>`` (a lone run: its folder's name) with ``resume="allow"``, group =
the sweep id, config = the resolved config, history = every numeric field of every metrics line at
its ``step``, summary = the trial's results row. Files under ``<run folder>/wandb/``; an offline
run (``WANDB_MODE=offline`` or ``tracking.wandb_mode=offline``) is uploaded later with
``wandb sync <run folder>/wandb/offline-run-*`` (a requeued job adds a folder; both continue one run).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import wandb
from wandb.proto import wandb_internal_pb2

from ltssl.config import to_dict
from ltssl.tracking.common import RunIdentity, Tracker, scalars, summary_row, wandb_mode


def _new_second(folder: Path, run_id: str) -> None:
    """Wait until no run folder of ``run_id`` carries the current second: W&B names a run's folder
    ``<mode>-<start time to the second>-<id>``, and a second start of the same run within that
    second (a job restarted at once) would write into the first one's folder and lose it."""
    while any(folder.glob(f"*-{datetime.now():%Y%m%d_%H%M%S}-{run_id}")):
        time.sleep(0.1)


class WandbTracker(Tracker):
    """One W&B run per trial (see the module docstring)."""

    def __init__(self, cfg: Any, ident: RunIdentity):
        self.cfg, self.ident = cfg, ident
        _new_second(ident.run_dir / "wandb", ident.run_id)
        self.run = wandb.init(
            project=cfg.tracking.wandb_project,
            entity=cfg.tracking.wandb_entity,
            id=ident.run_id,
            name=ident.trial_id,
            group=ident.sweep_id,
            job_type="trial" if ident.sweep_id else "train",
            resume="allow",
            reinit="create_new",  # never hand back a run an earlier job in this process left open
            config=to_dict(cfg),
            dir=str(ident.run_dir),
            mode=wandb_mode(cfg),
            # the job's stdout/stderr stay the job's (submitit's logs), not captured twice
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, line: dict[str, Any]) -> None:
        step = line.get("step")
        values = scalars(line)
        if values and isinstance(step, int):
            self.run.log(values, step=step)

    def close(self, result: dict[str, Any] | None) -> None:
        if result is not None:
            self.run.summary.update(summary_row(self.ident, self.cfg, result))
        self.run.finish(exit_code=0 if result is not None else 1)


# ----------------------------------------------------------------------------- reading offline runs
#: The .wandb record log: a 7-byte file header, then 32 KiB blocks of records, each a 7-byte header
#: (CRC32, little-endian uint16 length, type: 1 full, 2 first, 3 middle, 4 last chunk) and its bytes.
#: wandb 0.31 has no public Python reader (its writer is in the Go core).
_FILE_HEADER, _BLOCK, _RECORD_HEADER = 7, 32768, 7


def read_records(path: str | os.PathLike) -> list[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``run-<id>.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B record log")
    records, pending, pos = [], b"", _FILE_HEADER
    while pos + _RECORD_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER:  # the block's tail is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        pending += data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(folder: str | os.PathLike) -> dict[str, Any]:
    """What an offline run folder (``.../wandb/offline-run-*``) holds: ``{"id", "group", "project",
    "config": {key: value}, "history": [{"_step": s, key: value, ...}], "summary": {key: value},
    "exited": whether the run's end is recorded}``. W&B's core process writes the file after
    ``finish()`` returns: a reader in the same process waits for ``exited``."""
    (path,) = Path(folder).glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exited": False}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, group=record.run.run_group, project=record.run.project)
            out["config"].update((u.key, json.loads(u.value_json)) for u in record.run.config.update)
        elif kind == "config":
            out["config"].update((u.key, json.loads(u.value_json)) for u in record.config.update)
        elif kind == "history":
            out["history"].append({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in record.history.item})
        elif kind == "summary":
            out["summary"].update((u.key or ".".join(u.nested_key), json.loads(u.value_json)) for u in record.summary.update)
        elif kind == "exit":
            out["exited"] = True
    return out
