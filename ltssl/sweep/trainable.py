"""The Ray Tune trainable of a sweep: one trial = one training job, followed through its metrics file.

A trial runs in a Ray actor that needs almost no resources: it submits the training job with
:func:`ltssl.launch.submit` (Slurm with a partition, the local executor without), tails
``run_dir/metrics.jsonl`` and returns each new line from :meth:`JobTrial.step`, so Tune's scheduler,
the console and the dashboard see the job's progress live. At the end it returns the job's result
(``done``); a failed job raises, with the job's remote traceback, and fails only this trial.

**One monitor for the whole sweep.** Trials do not poll Slurm or their files themselves: one
:class:`JobMonitor` actor per sweep (named after the sweep, created by the first trial that needs
it) asks Slurm about every job in flight with one batched squeue per interval
(:class:`ltssl.launch.monitor.SlurmStateMonitor`: adaptive interval, failures retried with
backoff), checks every trial's metrics file and result file each ``poll_interval_s``, and wakes only
the trials whose job changed. A trial blocks in :meth:`JobMonitor.wait` in between: no actor wakes
up twice a second for nothing. Its Slurm handle reads the job's state from the monitor's last
observation (``SlurmJob.state_source``), so a squeue that fails is the monitor's transient problem,
never a failed trial; a job that finishes meanwhile is seen through its result file.

**Named in the dashboard.** :func:`trial_class` binds the sweep's context and resources to a class
that keeps the name ``JobTrial`` (resources through ``default_resource_request``, not Tune's
``with_resources`` wrapper, whose class is ``with_resources.<locals>.ResourceTrainable``); its repr
(Ray's ``repr_name``) names the trial, its group and its swept parameters. Ray takes that repr once,
when the actor is created, so a sweep that names its actors this way must not reuse an actor for
the next trial (``reuse_actors=False``): a reused actor would go on naming its first trial.

A stopped trial's job must be cancelled at once. A function trainable's ``finally:`` cannot do it:
Ray kills the ``scancel`` subprocess together with the trial (it succeeded in 1 of 5 tries), while
both a class trainable's ``cleanup()`` and the driver's ``on_trial_complete`` cancelled every time.
The driver's ``on_trial_complete`` is the canceller; ``cleanup()`` (Tune stops the actor) and
``reset_config()`` (Tune hands the actor, reused, to the next trial) are backstops: cancelling an
ended job is a no-op.

``setup`` and ``reset_config`` have no side effect; the job is submitted by the trial's first
:meth:`JobTrial.step`, after the trial is claimed in the ledger, because Tune may run ``setup`` on an
actor that it then discards. A trial whose ledger record already names a job reattaches to it when
it is still queued or running (a resumed sweep), and resubmits on the same ``run_dir`` otherwise, so
training resumes from ``run_dir/checkpoints/last.pt`` rather than from epoch 0.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ltssl.config import load_config
from ltssl.launch import JobCancelledError, JobFailedError, JobHandle, LaunchError, SlurmJob, submit
from ltssl.launch.job import DEFAULT_TARGET
from ltssl.launch.monitor import JobMonitor
from ltssl.launch.slurm_state import Observation
from ltssl.results import parse_json_lines
from ltssl.sweep.ledger import DETACH_MARKER, Ledger, LedgerClaimError
from ltssl.sweep.spec import ALIASES

#: A step without a new metrics line returns a heartbeat after this long, so Tune can stop the
#: trial (Ctrl-C) without waiting for a job that sits in Slurm's queue.
HEARTBEAT_S = 10.0

#: A swept key's name in the dashboard: the sweep file's alias (optimizer=rwsam, not name=rwsam).
_SHORT_NAMES = {dotted: alias for alias, dotted in ALIASES.items()}

#: Ray namespace of the sweeps' monitor actors (each named after its sweep).
MONITOR_NAMESPACE = "ltssl-sweep"


@dataclass
class TrialContext:
    """What every trial actor needs besides its Tune config (bound once by :func:`trial_class`)."""

    output_dir: str
    sweep_id: str
    target: str = DEFAULT_TARGET
    target_kwargs: dict = field(default_factory=dict)
    poll_interval_s: float = 0.5     # the monitor's look at every trial's files (seconds)

    @property
    def monitor_name(self) -> str:
        return f"ltssl-job-monitor-{self.sweep_id}"


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


# --------------------------------------------------------------------------- the sweep's monitor


def monitor_handle(ctx: TrialContext):
    """The sweep's :class:`~ltssl.launch.monitor.JobMonitor` actor, created by the first trial that asks.

    The class lives in :mod:`ltssl.launch.monitor`, which imports neither Tune nor pandas: the
    monitor's process stays small and starts fast.

    Detached, so that it outlives that trial (the sweep's ``ray.shutdown()`` ends it), in a namespace
    of its own (a detached actor in the driver's anonymous namespace makes Ray print a warning on
    the sweep's console), and scheduled outside the trial's placement group: by default an actor
    created inside a Tune trial lands in that trial's group, and is killed when the group is removed
    at the trial's end. Ray restarts it if it dies: trials register again with their next wait.
    """
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(JobMonitor)
    return actor.options(name=ctx.monitor_name, namespace=MONITOR_NAMESPACE, get_if_exists=True, lifetime="detached",
                         scheduling_strategy="DEFAULT").remote(ctx.poll_interval_s)


# --------------------------------------------------------------------------- the trial


class TrialJob:
    """The job of one trial, followed through the sweep's monitor.

    Claims the trial in the ledger, then re-attaches to its job, takes its finished result, or
    submits (:meth:`launch`); blocks until the monitor reports a change (:meth:`wait`); its Slurm
    handle reads the job's state from the monitor's last observation (no Slurm call of its own).
    """

    def __init__(self, ctx: TrialContext, key: str, ledger: Ledger, run_dir: Path, cfg, monitor=None):
        self.ctx, self.key, self.ledger, self.run_dir, self.cfg = ctx, key, ledger, run_dir, cfg
        self.monitor = monitor
        self.handle: JobHandle | None = None
        self.version = -1
        self.observation: Observation | None = None

    def launch(self) -> None:
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
            self._follow(value)
            self.ledger.update(self.key, status="running", job_id=value.job_id)
        elif action == "failed":
            self.ledger.update(self.key, error=value)
            raise RuntimeError(value)
        else:
            self.ledger.update(self.key, status="submitting")
            # The driver ran the same preflight on every distinct job shape of the sweep before the
            # first trial; here it would import the trainer's registries (torch) in every actor.
            self._follow(submit(self.cfg, self.run_dir, target=self.ctx.target,
                                target_kwargs=self.ctx.target_kwargs or None, preflight=False))
            self.ledger.update(self.key, status="running", job_id=self.handle.job_id)

    def _follow(self, handle: JobHandle) -> None:
        self.handle = handle
        if isinstance(handle, SlurmJob):
            handle.state_source = self._observation_of
        if self.monitor is None:
            self.monitor = monitor_handle(self.ctx)

    def _observation_of(self, job_id: str) -> Observation:
        # Before the monitor's first round covers the job: an empty squeue answer (state UNKNOWN,
        # not an end), which costs no Slurm call.
        return self.observation if self.observation is not None else Observation({}, None, time.time())

    def wait(self, timeout_s: float) -> None:
        """Block until the monitor reports a change of this job (or ``timeout_s`` seconds)."""
        watched = {"job_id": self.handle.job_id, "executor": self.handle.executor,
                   "files": [str(self.run_dir / "metrics.jsonl"), str(self.handle.paths(0).result_pickle)]}
        try:
            self.version, observation = ray.get(self.monitor.wait.remote(self.key, watched, self.version, timeout_s),
                                                timeout=timeout_s + 30)
            if observation is not None:
                self.observation = observation
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            time.sleep(self.ctx.poll_interval_s)  # the monitor restarts: look again at the files meanwhile

    def done(self) -> bool:
        return self.handle.done()

    def result(self) -> Any:
        """The job's result; a failure is written to the ledger (remote traceback) and raised."""
        self.forget()
        try:
            return self.handle.result(timeout=60)
        except LaunchError as error:  # JobFailedError, JobCancelledError
            self.ledger.update(self.key, error=str(error))
            raise

    def state(self) -> str:
        try:
            return self.handle.state
        except Exception:  # a heartbeat must not fail the trial
            return "UNKNOWN"

    def forget(self) -> None:
        if self.monitor is not None:
            self.monitor.forget.remote(self.key)

    def cancel(self) -> None:
        """Cancel the job if it still runs (a job the driver left running on SIGTERM stays)."""
        self.forget()
        if self.handle is None or (Path(self.ctx.output_dir) / DETACH_MARKER).exists():
            return  # the driver got SIGTERM: jobs keep running and a resumed sweep re-attaches
        if self.handle.lost_reason is not None:
            return  # slurmctld stayed unreachable: the job may still run, and --resume re-attaches to it
        try:
            if not self.handle.done():
                self.handle.cancel()
        except Exception:  # the driver cancels again from on_trial_complete
            pass


class JobTrial(tune.Trainable):
    """One sweep trial: config = ``{"trial_key": ..., "group": ..., <dotted key>: value, ...}``.

    Use :func:`trial_class` to get the class Tune runs (context and resources bound).
    """

    _context: TrialContext | None = None
    _resources: dict | None = None

    @classmethod
    def default_resource_request(cls, config: dict):
        from ray.tune.execution.placement_groups import PlacementGroupFactory  # only the driver asks

        return PlacementGroupFactory([dict(cls._resources)]) if cls._resources else None

    def setup(self, config: dict, context: TrialContext | None = None) -> None:
        self.ctx = context or self._context
        assert self.ctx is not None, "JobTrial needs its TrialContext (trial_class)"
        self.job: TrialJob | None = None
        self.finished = True
        self._prepare(config)

    def __repr__(self) -> str:
        """The actor's name in Ray's dashboard ("Repr"): trial, group and swept parameters."""
        config = getattr(self, "config", None) or {}
        params = {_SHORT_NAMES.get(k, k): v for k, v in config.items() if k not in ("trial_key", "group")}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
        return f"JobTrial({config.get('trial_key', '?')} [{config.get('group', '?')}] {shown})".replace(" )", ")")

    def reset_config(self, new_config: dict) -> bool:
        """Tune reuses this actor for the next trial (``reuse_actors``): the previous trial's job is
        cancelled first if it still runs (the driver's ``on_trial_complete`` has normally done so)."""
        self.cleanup()
        self._prepare(new_config)
        return True

    def _prepare(self, config: dict) -> None:
        """Read the trial's record; no side effect. The job is started by the first :meth:`step`.

        With actor reuse Tune may start an actor for a trial and then give the trial a cached
        actor instead, removing the first one after its ``setup`` ran: a ``setup`` that submitted
        would leave a second job behind. Only the actor Tune trains submits.
        """
        self.key = config["trial_key"]
        ledger = Ledger(self.ctx.output_dir)
        record = ledger.read(self.key)
        run_dir = Path(record["run_dir"])
        monitor = self.job.monitor if self.job is not None else None
        self.job = TrialJob(self.ctx, self.key, ledger, run_dir, load_config(record["config"]), monitor)
        self.launched = False
        self.finished = False
        self.queue: deque = deque()
        self.tail = MetricsTail(run_dir / "metrics.jsonl")
        self.last_epoch = 0

    def _report(self, line: dict) -> dict:
        epoch = line.get("epoch")
        if isinstance(epoch, int):
            self.last_epoch = max(self.last_epoch, epoch)
        return {**_scalars(line), "trial_key": self.key}

    def step(self) -> dict:
        if not self.launched:
            self.launched = True
            self.job.launch()
        deadline = time.monotonic() + HEARTBEAT_S
        while True:
            if self.queue:
                return self._report(self.queue.popleft())
            lines = self.tail.read()
            if lines:
                self.queue.extend(lines)
                continue
            if self.job.done():
                lines = self.tail.read()
                if lines:
                    self.queue.extend(lines)
                    continue
                return self._final()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {"trial_key": self.key, "heartbeat": True, "job_state": self.job.state()}
            self.job.wait(remaining)

    def _final(self) -> dict:
        result = self.job.result()
        self.finished = True
        out = _scalars(result if isinstance(result, dict) else {})
        out.setdefault("epoch", out.get("epochs_run", self.last_epoch))
        return {**out, "trial_key": self.key, "final": True, "done": True}

    def cleanup(self) -> None:
        """Tune stops the trial (scheduler, Ctrl-C) or it ended: cancel a job that still runs."""
        if self.job is not None and not self.finished:
            self.job.cancel()
        elif self.job is not None:
            self.job.forget()

    # The job checkpoints itself (run_dir/checkpoints); Tune needs these to exist all the same.
    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        return {"trial_key": self.key}

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None


def trial_class(context: TrialContext, resources: dict) -> type[JobTrial]:
    """The class Tune runs for this sweep: :class:`JobTrial` with ``context`` and ``resources``
    (Ray resource name -> amount per trial, e.g. ``{"CPU": 0.01, "sweep_trial_slot": 1}``) bound.

    It keeps the class name ``JobTrial`` in Ray's dashboard (see the module docstring).
    """
    resources = {("CPU" if k == "cpu" else "GPU" if k == "gpu" else k): v for k, v in resources.items()}
    return type("JobTrial", (JobTrial,), {"_context": context, "_resources": resources, "__doc__": JobTrial.__doc__})
