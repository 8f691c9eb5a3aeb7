"""One trial of a sweep as the driver follows it: its job, its metrics file, its name.

A trial is not a process of its own. The driver's loop (:mod:`ltssl.sweep.loop`) holds one
:class:`Trial` per trial in flight: the object Ray Tune's searcher and scheduler are given
(``trial_id``, ``config``), the trial's :class:`TrialJob` (claim in the ledger, re-attach or
submit, the job's handle) and a :class:`MetricsTail` on ``run_dir/metrics.jsonl``. Its Slurm
handle reads the job's state from the sweep's one :class:`~ltssl.launch.monitor.SlurmStateMonitor`
(``SlurmJob.state_source``): no trial asks Slurm anything on its own.

:func:`reconcile` decides what a ledger record's job needs (re-attach, take its result, or submit
again on the same ``run_dir``, so training resumes from its checkpoint): for a trial the loop
starts and for a resumed sweep's settling (:mod:`ltssl.sweep.resume`).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ltssl.config import load_config
from ltssl.launch import JobCancelledError, JobFailedError, JobHandle, LaunchError, SlurmJob, submit
from ltssl.launch.job import DEFAULT_TARGET
from ltssl.launch.slurm_state import Observation
from ltssl.results import parse_json_lines
from ltssl.sweep.ledger import Ledger, LedgerClaimError
from ltssl.sweep.spec import ALIASES

#: A swept key's name where trials are shown: the sweep file's alias (optimizer=rwsam, not name=rwsam).
_SHORT_NAMES = {dotted: alias for alias, dotted in ALIASES.items()}


class MetricsTail:
    """Reads the complete new lines of a JSON-lines file that another process appends to."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._partial = b""
        self._size = -1

    def read(self) -> list[dict]:
        try:
            size = os.stat(self.path).st_size
            if size == self._size:
                return []  # a stat per look; the file is opened only when it grew
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self._size = size
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        return parse_json_lines(complete)


def scalars(line: dict) -> dict:
    """The numeric, boolean and string fields of a metrics line (lists such as per_class_acc are left out)."""
    out = {}
    for key, value in line.items():
        if key in ("done", "config", "trial_id"):  # names the driver gives a meaning of its own
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def describe(config: dict) -> str:
    """A trial's name where it is shown (console, dashboard): key, group and swept values.

    ``{"trial_key": "t0001", "group": "digits/r=10/lt/simsiam", "optim.rho": 0.05}`` ->
    ``"t0001 [digits/r=10/lt/simsiam] rho=0.05"``.
    """
    params = {_SHORT_NAMES.get(k, k): v for k, v in config.items() if k not in ("trial_key", "group")}
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    return f"{config.get('trial_key', '?')} [{config.get('group', '?')}] {shown}".rstrip()


def reconcile(record: dict):
    """Where the job of a ledger record stands: ``("attach", handle)``, ``("finished", handle)``,
    ``("failed", message)`` or ``("submit", None)``.

    * queued or running: attach (no second job);
    * ended with a result: finished (the trial is over, nothing runs again);
    * ended with an error: failed, with the job's traceback;
    * never submitted, cancelled (an interrupted sweep) or unknown to Slurm: submit again on the
      same run_dir, which resumes from the job's last checkpoint.
    """
    run_dir = record.get("run_dir")
    if not run_dir or not (Path(run_dir) / "job.json").is_file():
        return ("submit", None)
    try:
        handle = JobHandle.attach(run_dir)
    except LaunchError:
        return ("submit", None)
    ids = record.get("job_ids") or []
    if ids and handle.job_id not in ids and record.get("status") != "submitting":
        return ("submit", None)  # job.json names a job this sweep did not start
    try:
        done = handle.done()
    except LaunchError:
        return ("submit", None)
    if not done:
        return ("attach", handle)
    try:
        handle.result(timeout=30)
        return ("finished", handle)
    except JobCancelledError:
        return ("submit", None)
    except JobFailedError as error:
        return ("failed", str(error))
    except LaunchError:
        return ("submit", None)


class TrialJob:
    """The job of one trial: claimed in the ledger, then re-attached, taken as finished, or submitted.

    Args:
        key: the trial's ledger id (``t0003``).
        ledger: the sweep's ledger.
        target, target_kwargs: what the job runs (``module:function`` and its keyword arguments).
        state_source: ``job_id -> Observation | None``, the sweep monitor's last observation of a
            Slurm job (None before its first round covers the job).
    """

    def __init__(self, key: str, ledger: Ledger, *, target: str = DEFAULT_TARGET, target_kwargs: dict | None = None,
                 state_source: Callable[[str], Observation | None] | None = None):
        self.key, self.ledger = key, ledger
        self.target, self.target_kwargs = target, target_kwargs or None
        self.state_source = state_source
        self.run_dir = Path(ledger.read(key)["run_dir"])
        self.handle: JobHandle | None = None

    def launch(self) -> JobHandle:
        """Claim the trial for this driver and start following its job (submitting one if needed).

        Raises RuntimeError with the job's error when its job had already failed (a resumed sweep).
        """
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        deadline = time.monotonic() + 30  # a killed driver's last ledger write may still be on its way
        while True:
            try:
                record = self.ledger.claim(self.key, owner=owner)
                break
            except LedgerClaimError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        action, value = reconcile(record)
        if action in ("attach", "finished"):
            self._follow(value)
        elif action == "failed":
            self.ledger.update(self.key, error=value)
            raise RuntimeError(value)
        else:
            self.ledger.update(self.key, status="submitting")
            # The driver ran the same preflight on every distinct job shape of the sweep before the
            # first trial; here it would import the trainer's registries (torch) into the driver.
            self._follow(submit(load_config(record["config"]), self.run_dir, target=self.target, target_kwargs=self.target_kwargs,
                                preflight=False))
        self.ledger.update(self.key, status="running", job_id=self.handle.job_id)
        return self.handle

    def _follow(self, handle: JobHandle) -> None:
        if isinstance(handle, SlurmJob) and self.state_source is not None:
            source = self.state_source
            # Before the monitor's first round covers the job: an empty squeue answer (state
            # UNKNOWN, not an end), which costs no Slurm call.
            handle.state_source = lambda job_id: source(job_id) or Observation({}, None, time.time())
        self.handle = handle

    def result(self) -> Any:
        """The job's result (it has ended); a failure is written to the ledger (remote traceback) and raised."""
        try:
            return self.handle.result(timeout=60)
        except LaunchError as error:  # JobFailedError, JobCancelledError
            self.ledger.update(self.key, error=str(error))
            raise


class Trial:
    """One trial in flight, as Tune's searcher and scheduler see it (``trial_id``, ``config``).

    ``config`` is the searcher's suggestion: ``{"trial_key", "group", <dotted key>: value, ...}``.
    """

    def __init__(self, trial_id: str, config: dict, job: TrialJob):
        self.trial_id = trial_id
        self.config = config
        self.key: str = config["trial_key"]
        self.job = job
        self.tail = MetricsTail(job.run_dir / "metrics.jsonl")
        self.last_epoch = 0
        self.last_result: dict = {}
        self.pending = None          # a Future: the launch, or the final result, running in a thread
        self.phase = "launching"     # launching -> running -> ending
        self.result_seen = False     # its job's result file has appeared (the monitor was told)

    def __repr__(self) -> str:
        return f"Trial({describe(self.config)})"

    def report(self, line: dict) -> dict:
        """A metrics line as the result Tune's scheduler reads (its scalars, ``epoch`` kept current)."""
        epoch = line.get("epoch")
        if isinstance(epoch, int):
            self.last_epoch = max(self.last_epoch, epoch)
        self.last_result = {**scalars(line), "trial_key": self.key}
        return self.last_result

    def final(self, result: Any) -> dict:
        """The job's result as the trial's last result (``done``)."""
        out = scalars(result if isinstance(result, dict) else {})
        out.setdefault("epoch", out.get("epochs_run", self.last_epoch))
        self.last_result = {**out, "trial_key": self.key, "final": True, "done": True}
        return self.last_result
