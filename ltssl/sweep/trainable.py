"""The Ray Tune trainable of a sweep: one trial = one training job, followed through its metrics file.

A trial runs in a Ray actor that needs almost no resources (``{"cpu": 0.01}``): it submits the
training job with :func:`ltssl.launch.submit` (Slurm with a partition, the local executor
without), tails ``run_dir/metrics.jsonl`` and returns each new line from :meth:`step`, so Tune's
scheduler, the console and the dashboard see the job's progress live. At the end it returns the
job's result (``done``); a failed job raises, with the job's remote traceback, and fails only
this trial.

A stopped trial's job must be cancelled at once. A function trainable's ``finally:`` cannot do
it (Ray kills the ``scancel`` with the trial; /work/shared/notes/ray.md); the driver's
``on_trial_complete`` can, every time, and is the canceller. This class trainable adds its own
``cleanup()`` (Tune stops the actor) and ``reset_config()`` (Tune hands the actor, reused, to the
next trial) as backstops: cancelling an ended job is a no-op.

Actors are reused from trial to trial (no process start, no re-import per trial). ``setup`` and
``reset_config`` have no side effect; the job is submitted by the trial's first :meth:`step`,
after the trial is claimed in the ledger, because Tune may run ``setup`` on an actor that it then
discards in favour of a cached one.

A trial whose ledger record already names a job reattaches to it when it is still queued or
running (a resumed sweep), and resubmits on the same ``run_dir`` otherwise, so training resumes
from ``run_dir/checkpoints/last.pt`` rather than from epoch 0.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from ltssl.results import parse_json_lines
from ltssl.sweep.ledger import DETACH_MARKER, Ledger

#: The trainer's default entry point (``ltssl.launch.submit``'s target).
DEFAULT_TARGET = "ltssl.train:train"

#: A step without a new metrics line returns a heartbeat after this long, so Tune can stop the
#: trial (Ctrl-C) without waiting for a job that sits in Slurm's queue.
HEARTBEAT_S = 10.0


@dataclass
class TrialContext:
    """What every trial actor needs besides its Tune config (sent once through ``tune.with_parameters``)."""

    output_dir: str
    sweep_id: str
    target: str = DEFAULT_TARGET
    target_kwargs: dict = field(default_factory=dict)
    poll_interval_s: float = 0.5     # metrics file reads
    job_poll_s: float = 2.0          # squeue/sacct reads (the final metrics line triggers one at once)


class MetricsTail:
    """Reads the complete new lines of a JSON-lines file that another process appends to."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        return parse_json_lines(complete)


def _scalars(line: dict) -> dict:
    """The numeric and boolean fields of a metrics line (lists such as per_class_acc are left out)."""
    out = {}
    for key, value in line.items():
        if key in ("done", "config", "trial_id"):  # Tune's own result keys
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def submit_checked(cfg, run_dir, *, target: str, target_kwargs: dict | None):
    """:func:`ltssl.launch.submit` without repeating its preflight in the trial actor.

    The driver ran the same preflight on every distinct job shape of the sweep before the first
    trial (:mod:`ltssl.sweep.prepare`). Repeating it here imports the trainer's registries, i.e.
    torch: about 0.7 GB and 5-7 s per trial actor on this machine, which would dominate the
    per-trial cost of a sweep and its driver's memory. A refusal that appears later (a partition
    removed mid-sweep) still fails the trial, through sbatch.
    """
    import importlib
    import inspect

    launch_submit = importlib.import_module("ltssl.launch.submit")  # the module (the package exports a function of that name)

    if "preflight" in inspect.signature(launch_submit.submit).parameters:
        return launch_submit.submit(cfg, run_dir, target=target, target_kwargs=target_kwargs, preflight=False)
    original = launch_submit.preflight
    launch_submit.preflight = lambda *_args, **_kwargs: None  # this actor process only
    try:
        return launch_submit.submit(cfg, run_dir, target=target, target_kwargs=target_kwargs)
    finally:
        launch_submit.preflight = original


def reconcile(record: dict):
    """Where the job of a ledger record stands: ``("attach", handle)``, ``("finished", handle)``,
    ``("failed", message)`` or ``("submit", None)``.

    * queued or running: attach (no second job);
    * ended with a result: finished (the trial is over, nothing runs again);
    * ended with an error: failed, with the job's traceback;
    * never submitted, cancelled (an interrupted sweep) or unknown to Slurm: submit again on the
      same run_dir, which resumes from the job's last checkpoint.
    """
    from ltssl.launch import JobCancelledError, JobFailedError, JobHandle, LaunchError

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


class JobTrial(tune.Trainable):
    """One sweep trial: config = ``{"trial_key": ..., "group": ..., <dotted key>: value, ...}``."""

    def setup(self, config: dict, context: TrialContext | None = None) -> None:
        assert context is not None, "JobTrial needs its TrialContext (tune.with_parameters)"
        self.ctx = context
        self.job = None
        self.finished = True
        self._prepare(config)

    def reset_config(self, new_config: dict) -> bool:
        """Tune reuses this actor for the next trial (``reuse_actors``): no process start-up, no
        re-import. The previous trial's job is cancelled first if it still runs (the driver's
        ``on_trial_complete`` has normally done so already)."""
        self.cleanup()
        self._prepare(new_config)
        return True

    def _prepare(self, config: dict) -> None:
        """Read the trial's record; no side effect. The job is started by the first :meth:`step`.

        With actor reuse Tune may start an actor for a trial and then give the trial a cached
        actor instead, removing the first one after its ``setup`` ran: a ``setup`` that submitted
        would leave a second job behind (seen here with Ray 2.60). Only the actor Tune trains
        submits.
        """
        from ltssl.config import load_config

        self.key = config["trial_key"]
        self.ledger = Ledger(self.ctx.output_dir)
        record = self.ledger.read(self.key)
        self.run_dir = Path(record["run_dir"])
        self.cfg = load_config(record["config"])
        self.job = None
        self.launched = False
        self.finished = False
        self.final_seen = False
        self.queue: deque = deque()
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl")
        self.last_epoch = 0
        self.next_job_check = 0.0

    def _launch(self) -> None:
        """Claim the trial, then re-attach to its job, take its finished result, or submit."""
        from ltssl.sweep.ledger import LedgerClaimError

        self.launched = True
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        deadline = time.monotonic() + 30  # a killed driver's actors take a few seconds to exit
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
            self.job = value
            self.ledger.update(self.key, status="running", job_id=value.job_id)
        elif action == "failed":
            self.ledger.update(self.key, error=value)
            raise RuntimeError(value)
        else:
            self._submit()

    def _submit(self) -> None:
        self.ledger.update(self.key, status="submitting")
        self.job = submit_checked(self.cfg, self.run_dir, target=self.ctx.target, target_kwargs=self.ctx.target_kwargs or None)
        self.ledger.update(self.key, status="running", job_id=self.job.job_id)

    def _report(self, line: dict) -> dict:
        epoch = line.get("epoch")
        if isinstance(epoch, int):
            self.last_epoch = max(self.last_epoch, epoch)
        if line.get("final"):
            self.final_seen = True
        return {**_scalars(line), "trial_key": self.key}

    def step(self) -> dict:
        if not self.launched:
            self._launch()
        started = time.monotonic()
        while True:
            if self.queue:
                return self._report(self.queue.popleft())
            lines = self.tail.read()
            if lines:
                self.queue.extend(lines)
                continue
            now = time.monotonic()
            if self.final_seen or now >= self.next_job_check:
                self.next_job_check = now + self.ctx.job_poll_s
                if self.job.done():
                    lines = self.tail.read()
                    if lines:
                        self.queue.extend(lines)
                        continue
                    result = self._result()
                    self.finished = True
                    out = _scalars(result if isinstance(result, dict) else {})
                    out.setdefault("epoch", out.get("epochs_run", self.last_epoch))
                    return {**out, "trial_key": self.key, "final": True, "done": True}
            if now - started > HEARTBEAT_S:
                return {"trial_key": self.key, "heartbeat": True, "job_state": self._state()}
            time.sleep(self.ctx.poll_interval_s if not self.final_seen else 0.1)

    def _result(self) -> Any:
        """The job's result; a failure is written to the ledger (remote traceback) and raised."""
        from ltssl.launch import LaunchError

        try:
            return self.job.result(timeout=60)
        except LaunchError as error:  # JobFailedError, JobCancelledError
            self.ledger.update(self.key, error=str(error))
            raise

    def _state(self) -> str:
        try:
            return self.job.state
        except Exception:  # a transient squeue/sacct failure must not fail the trial
            return "UNKNOWN"

    def cleanup(self) -> None:
        """Tune stops the trial (scheduler, Ctrl-C) or it ended: cancel a job that still runs."""
        if self.job is None or self.finished:
            return
        if (Path(self.ctx.output_dir) / DETACH_MARKER).exists():
            return  # the driver got SIGTERM: jobs keep running and a resumed sweep re-attaches
        try:
            if not self.job.done():
                self.job.cancel()
        except Exception:  # the driver cancels again from on_trial_complete
            pass

    # The job checkpoints itself (run_dir/checkpoints); Tune needs these to exist all the same.
    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        return {"trial_key": self.key}

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None
