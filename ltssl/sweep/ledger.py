"""The sweep's own record of its trials: one small JSON file per trial, written atomically.

A sweep that drives Slurm jobs for days must resume from exactly what happened (a finished trial
never runs again, a running job is re-attached to, not restarted from scratch), so the sweep keeps ``<output-dir>/ledger/<trial_id>.json``::

    {"trial_id": "t0003", "status": "running", "params": {"optim.rho": 0.52, ...},
     "config": {...resolved training config...}, "group": "digits/r=10/lt/simsiam",
     "run_dir": ".../trials/t0003", "job_id": "17", "job_ids": ["12", "17"],
     "partition": "cpu", "error": null, "updated": 1732412345.2,
     "history": [["pending", 1732412301.0], ["submitting", 1732412301.1], ["running", 1732412301.4]]}

Status moves ``pending -> submitting -> running -> completed | stopped_early | failed |
cancelled``. ``submitting`` is written before a job is submitted and ``running`` (with the job
id) right after, so a driver killed in between still finds the job through ``run_dir/job.json``.
Writers (the driver's loop and its launch threads; a second driver, refused) take a per-trial ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ltssl.io import atomic_write_text
from ltssl.results import RESULT_STATUSES

#: Statuses of a trial that is over: a resumed sweep does not run it again.
FINISHED = ("completed", "stopped_early", "failed")
STATUSES = ("pending", "submitting", "running") + RESULT_STATUSES
#: Written into the sweep folder by a driver that stops on SIGTERM: trials leave their jobs running.
DETACH_MARKER = ".detached"


class LedgerClaimError(RuntimeError):
    """Another live process already drives this trial's job."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Ledger:
    """Per-trial JSON records under ``<output_dir>/ledger``."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / "ledger"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, trial_id: str) -> Path:
        return self.folder / f"{trial_id}.json"

    @contextlib.contextmanager
    def _locked(self, trial_id: str) -> Iterator[None]:
        with open(self.folder / f".{trial_id}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def exists(self, trial_id: str) -> bool:
        return self.path(trial_id).is_file()

    def read(self, trial_id: str) -> dict:
        return json.loads(self.path(trial_id).read_text())

    def create(self, entry: dict) -> dict:
        """Write a new record (status pending unless given); an existing record is kept as is."""
        trial_id = entry["trial_id"]
        with self._locked(trial_id):
            if self.path(trial_id).is_file():
                return self.read(trial_id)
            record = {"status": "pending", "job_id": None, "job_ids": [], "error": None, **entry}
            record["updated"] = time.time()
            record["history"] = [[record["status"], record["updated"]]]
            atomic_write_text(self.path(trial_id), json.dumps(record, indent=1, default=str))
            return record

    def update(self, trial_id: str, **fields: Any) -> dict:
        """Read-modify-write one record under its lock; returns the new record."""
        with self._locked(trial_id):
            record = self.read(trial_id)
            job_id = fields.get("job_id")
            if job_id is not None and job_id not in record.get("job_ids", []):
                record.setdefault("job_ids", []).append(job_id)
            now = time.time()
            if "status" in fields and fields["status"] != record.get("status"):
                record.setdefault("history", []).append([fields["status"], now])
            record.update(fields)
            record["updated"] = now
            atomic_write_text(self.path(trial_id), json.dumps(record, indent=1, default=str))
            return record

    def claim(self, trial_id: str, owner: dict) -> dict:
        """Make ``owner`` (``{"pid", "host"}``) the one process that drives this trial's job (history
        event ``started``).

        Raises :class:`LedgerClaimError` when another live process on this host holds it: two
        drivers must never submit for one trial. A claim of a dead process (a killed driver) is
        taken over.
        """
        with self._locked(trial_id):
            record = self.read(trial_id)
            held = record.get("owner") or {}
            if (held and held != owner and held.get("host") == owner.get("host")
                    and _alive(int(held.get("pid", 0))) and record.get("status") in ("submitting", "running")):
                raise LedgerClaimError(f"trial {trial_id} is already driven by pid {held.get('pid')}")
            record["owner"] = owner
            record["updated"] = time.time()
            record.setdefault("history", []).append(["started", record["updated"]])
            atomic_write_text(self.path(trial_id), json.dumps(record, indent=1, default=str))
            return record

    def all(self) -> list[dict]:
        """Every record, ordered by trial id."""
        records = []
        for path in sorted(self.folder.glob("t*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # atomic writes make this a file being created right now
        return records

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        for record in self.all():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts
