"""The sweep driver: Ray Tune where the user types the command, one Slurm (or local) job per trial.

:func:`run_sweep` does, in order:

1. read and check the sweep (:func:`ltssl.sweep.spec.load_sweep`) and every trial config it can
   generate; then, in a child process, preflight every distinct job shape and prepare every
   dataset (:mod:`ltssl.sweep.prepare`). Any refusal is one line and nothing is submitted;
2. create the output folder (``sweep.yaml``, ``sweep.json``, ``ledger/``, ``trials/``), or on
   ``resume`` read it back and settle what happened while no driver ran (jobs that finished are
   recorded, jobs still queued or running are re-attached, the rest resubmitted on their run_dir);
3. start Ray locally (short ``RAY_TMPDIR``, quiet console; the dashboard on 127.0.0.1 with Ray's
   token authentication when asked) and run Tune: :class:`~ltssl.sweep.searcher.SweepSearcher`
   hands out trials, :class:`~ltssl.sweep.scheduler.GroupedASHA` stops weak ones within their
   group, :class:`~ltssl.sweep.trainable.JobTrial` runs each as a job;
4. as each trial ends, write its status to the ledger, cancel its job if it still runs, and
   rewrite ``results.parquet`` and ``metrics.parquet``;
5. at the end print the results table and write the analysis report (``report/``).

Ctrl-C stops the sweep: running jobs are cancelled (they checkpoint on SIGTERM) and their trials
recorded ``cancelled``; ``--resume`` continues them. SIGTERM (a login node shutting down) leaves
the jobs running and ``--resume`` re-attaches to them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ltssl.io import atomic_write_text
from ltssl.results import RESULT_STATUSES
from ltssl.sweep.ledger import DETACH_MARKER, Ledger
from ltssl.sweep.spec import SweepError, SweepSpec, load_sweep

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SWEEP = REPO_ROOT / "sweeps" / "digits_lt" / "default.yaml"
DEFAULT_TARGET = "ltssl.train:train"
#: Ray resource that bounds the trials running at once (one per trial, max_concurrent in all).
TRIAL_SLOT = "sweep_trial_slot"


@dataclass
class SweepOutcome:
    """What a sweep run leaves: its folder, files and trial counts."""

    output_dir: Path
    sweep_id: str
    counts: dict = field(default_factory=dict)
    results_path: Path | None = None
    metrics_path: Path | None = None
    report_dir: Path | None = None
    interrupted: str | None = None      # None, "cancelled" (Ctrl-C) or "detached" (SIGTERM)
    dashboard_url: str | None = None


# ------------------------------------------------------------------------------ folders


def default_output_dir(spec: SweepSpec, root: Path | None = None) -> Path:
    return (root or Path("results")) / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_output_dir(name: str, root: Path | None = None) -> Path | None:
    """The newest ``results/<name>-*`` folder holding a sweep, for ``--resume`` without a folder."""
    root = root or Path("results")
    found = sorted((p for p in root.glob(f"{name}-*") if (p / "sweep.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _ray_tmpdir() -> str:
    """A short temp folder for Ray (its Unix socket paths have a length limit)."""
    return os.environ.get("RAY_TMPDIR") or f"/tmp/ltssl-ray-{os.getuid()}"


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port for the dashboard")


def _login() -> str:
    """``user@host`` of this (login) node, for the ssh port-forward hint."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "you"
    host = socket.gethostname()
    fqdn = socket.getfqdn(host)
    return f"{user}@{fqdn if '.' in fqdn and not fqdn.startswith('localhost') else host}"


def token_location() -> str:
    """Where Ray reads its authentication token from (same order as Ray)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return str(Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip()
    except OSError:
        return None


# ------------------------------------------------------------------------------ checks


def _quick_preflight(configs: list[dict]) -> None:
    """:func:`ltssl.launch.preflight` without the trainer's name checks (which import torch)."""
    from ltssl.launch import LaunchError
    from ltssl.sweep.prepare import check_and_prepare

    try:
        check_and_prepare(configs, prepare=False, check_names=False)
    except LaunchError as error:
        raise SweepError(str(error).strip().splitlines()[0]) from None


def _check_jobs(configs: list[dict], prepare: bool, check_names: bool = True) -> list[dict]:
    """Preflight and dataset preparation in a child process; SweepError with its one line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(configs, fh)
        path = fh.name
    try:
        cmd = [sys.executable, "-m", "ltssl.sweep.prepare", path] + ([] if prepare else ["--no-prepare"])
        cmd += [] if check_names else ["--no-check-names"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
    finally:
        os.unlink(path)
    if proc.returncode == 2:
        raise SweepError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "preflight failed")
    if proc.returncode != 0:
        raise RuntimeError(f"dataset preparation crashed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------------ bookkeeping


def metric_history(run_dir: str | Path, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of every line of a trial's metrics.jsonl that carries ``metric``."""
    from ltssl.results import read_jsonl

    out = []
    for line in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        value, epoch = line.get(metric), line.get("epoch")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(epoch, int) and not line.get("final"):
            out.append((epoch, float(value)))
    return out


def final_metric(run_dir: str | Path, metric: str, status: str) -> float | None:
    if status == "completed":
        try:
            value = json.loads((Path(run_dir) / "result.json").read_text()).get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        except (OSError, json.JSONDecodeError):
            pass
    history = metric_history(run_dir, metric)
    return history[-1][1] if history else None


def cancel_job(run_dir: str | Path) -> bool:
    """Cancel the job last submitted into ``run_dir`` if it has not ended; True when it had to."""
    from ltssl.launch import JobHandle, LaunchError

    try:
        handle = JobHandle.attach(run_dir)
        if handle.done():
            return False
        handle.cancel()
        return True
    except (LaunchError, OSError, ValueError):
        return False


class Bookkeeper:
    """Ledger status, job cancellation, parquet files and the console, as trials end."""

    def __init__(self, spec: SweepSpec, output_dir: Path, sweep_id: str, board=None):
        from ltssl.results import ResultsWriter

        self.spec = spec
        self.output_dir = output_dir
        self.ledger = Ledger(output_dir)
        self.writer = ResultsWriter(output_dir, sweep_id, metric=spec.metric, mode=spec.mode)
        self.board = board
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cancel")
        self.cancels: list = []
        self._lock = threading.Lock()

    def write_results(self) -> tuple[Path, Path]:
        with self._lock:
            return self.writer.write(self.ledger.all())

    def finish(self, key: str, status: str, error: str | None = None, cancel: bool = False) -> dict:
        record = self.ledger.read(key)
        if cancel and record.get("run_dir"):
            # Backstop to the trial's own cleanup(): off the Tune loop, it can take a second or two.
            self.cancels.append(self.pool.submit(cancel_job, record["run_dir"]))
        fields: dict[str, Any] = {"status": status}
        if error is not None and not record.get("error"):
            fields["error"] = error
        if status == "completed":
            fields["error"] = None
        run_dir = record.get("run_dir") or ""
        fields["metric_value"] = final_metric(run_dir, self.spec.metric, status) if run_dir else None
        fields["metric_history"] = metric_history(run_dir, self.spec.metric) if run_dir else []
        record = self.ledger.update(key, **fields)
        self.write_results()
        if self.board is not None:
            self.board.set_status(key, status)
            if status == "completed":
                self.board.offer(record["group"], key, record.get("metric_value"), record.get("params") or {})
            value = record.get("metric_value")
            shown = f" {self.spec.metric}={value:.4f}" if isinstance(value, float) else ""
            first_error = ""
            if status == "failed" and record.get("error"):
                lines = [ln for ln in str(record["error"]).splitlines() if ln.strip()]
                first_error = f": {lines[-1][:160]}" if lines else ""
            self.board.log(f"{time.strftime('%H:%M:%S')} {key} {status}{shown} [{record['group']}]{first_error}")
        return record

    def wait_cancels(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for fut in self.cancels:
            try:
                fut.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                pass
        self.pool.shutdown(wait=False)


def _inert_callback():
    from ray.tune import Callback

    return Callback()


def _tune_callback(book: Bookkeeper, scheduler):
    from ray.tune import Callback

    class SweepCallback(Callback):
        """Records every trial's end (status, error, metric) and keeps the console current."""

        def __reduce__(self):
            # Tune pickles its callbacks into the experiment folder for Tuner.restore, which this
            # sweep does not use (the ledger is its record): nothing to save.
            return (_inert_callback, ())

        def on_trial_start(self, iteration, trials, trial, **info):
            key = trial.config["trial_key"]
            book.ledger.mark(key, "started")  # Tune gave it a slot and an actor
            if book.board is not None:
                book.board.set_status(key, "running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            key = trial.config["trial_key"]
            stopped = scheduler is not None and key in scheduler.stopped
            result = trial.last_result or {}
            if stopped:
                book.finish(key, "stopped_early", cancel=True)
            elif result.get("done") and result.get("final"):
                book.finish(key, "completed")
            else:  # stopped by the driver (Ctrl-C) before it ended
                book.finish(key, "cancelled", cancel=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config["trial_key"]
            error = None
            try:
                error = Path(trial.error_file).read_text() if trial.error_file else None
            except OSError:
                pass
            book.finish(key, "failed", error=error or "trial failed (no error text)", cancel=True)

    return SweepCallback()


# ------------------------------------------------------------------------------ resume


def settle_unfinished(book: Bookkeeper, spec: SweepSpec, scheduler) -> dict[str, int]:
    """A resumed sweep: record trials whose jobs ended while no driver ran; count what is left.

    Jobs still queued or running are left for their trial to re-attach to; trials that finished
    earlier feed the scheduler's rungs so new trials are ranked against them.
    """
    from ltssl.sweep.trainable import reconcile

    counts = {"finished_while_away": 0, "failed_while_away": 0, "reattach": 0, "resubmit": 0}
    for record in book.ledger.all():
        key = record["trial_id"]
        if record["status"] in ("submitting", "running", "cancelled"):
            action, value = reconcile(record)
            if action == "finished":
                book.finish(key, "completed")
                counts["finished_while_away"] += 1
                record = book.ledger.read(key)
            elif action == "failed":
                book.finish(key, "failed", error=value)
                counts["failed_while_away"] += 1
                record = book.ledger.read(key)
            elif action == "attach":
                counts["reattach"] += 1
            else:
                counts["resubmit"] += 1
        if scheduler is not None and record["status"] in ("completed", "stopped_early"):
            scheduler.seed_history(record["group"], key, [tuple(x) for x in record.get("metric_history") or []])
    return counts


# ------------------------------------------------------------------------------ the run


def run_sweep(
    config: str | os.PathLike | dict | None = None,
    *,
    partition: str | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dashboard: bool | None = None,
    dashboard_port: int = 8265,
    max_concurrent: int | None = None,
    target: str | None = None,
    target_kwargs: dict | None = None,
    analyze: bool = True,
    prepare: bool = True,
    console=None,
    live: bool | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep; see the module docstring. Raises :class:`SweepError` before
    anything is submitted when the sweep, a trial config, the partition or a dataset is wrong.

    Args:
        config: sweep YAML path or mapping (default ``sweeps/digits_lt/default.yaml``).
        partition: Slurm partition for every trial; None runs each trial's job locally.
        output_dir: the sweep folder (default ``results/<name>-<timestamp>``).
        resume: continue the sweep in ``output_dir`` (default: the newest one of this sweep).
        dashboard: start Ray's dashboard (default: on with a partition, off locally).
        max_concurrent: trials (jobs) at once; overrides the sweep's ``max_concurrent``.
        target: ``"module:function"`` each job runs (default ``ltssl.train:train``; a resumed
            sweep keeps the one it started with).
        target_kwargs: extra keyword arguments of the target.
        analyze: write the report (``output_dir/report``) at the end.
        prepare: prepare the datasets before the first trial (the jobs would otherwise).
    """
    from rich.console import Console

    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:  # a log file: wide enough for the results table
            console = Console(highlight=False, width=140)
    # ---------------------------------------------------------------- the sweep and its folder
    if resume:
        if output_dir is None:
            name = load_sweep(config or DEFAULT_SWEEP).name
            found = latest_output_dir(name)
            if found is None:
                raise SweepError(f"--resume: no results/{name}-* folder with a sweep to resume (give --output-dir)")
            output_dir = found
        output_dir = Path(output_dir)
        if not (output_dir / "sweep.json").is_file():
            raise SweepError(f"--resume: {output_dir} holds no sweep (no sweep.json)")
        meta = json.loads((output_dir / "sweep.json").read_text())
        spec = load_sweep(yaml.safe_load((output_dir / "sweep.yaml").read_text()), name=meta["name"])
        if partition is not None and partition != meta.get("partition"):
            raise SweepError(
                f"--partition {partition}: this sweep was started with {meta.get('partition') or 'local jobs'}; resume without --partition"
            )
        partition = meta.get("partition")
        sweep_id = meta["sweep_id"]
        target = target or meta.get("target") or DEFAULT_TARGET
        if target_kwargs is None:
            target_kwargs = meta.get("target_kwargs") or None
    else:
        spec = load_sweep(config or DEFAULT_SWEEP)
        output_dir = Path(output_dir) if output_dir is not None else default_output_dir(spec)
        if (output_dir / "sweep.json").is_file():
            raise SweepError(f"--output-dir {output_dir} already holds a sweep: add --resume to continue it")
        sweep_id = output_dir.resolve().name
        target = target or DEFAULT_TARGET

    with contextlib.ExitStack() as stack:
        if resume:
            stack.enter_context(_driver_lock(output_dir))  # before anything starts
        if max_concurrent is not None:
            if max_concurrent < 1:
                raise SweepError(f"--max-concurrent must be >= 1, got {max_concurrent}")
            spec.max_concurrent = max_concurrent
        trials = spec.validate_trials(partition)
        if dashboard is None:
            dashboard = partition is not None

        # The quick checks (dataset folders, partition, resources) here, at once; the trainer's name
        # checks and the dataset preparation in a child process, overlapping with Ray's start-up.
        configs = [t.config for t in trials]
        _quick_preflight(configs)
        console.print(f"sweep {spec.name}: {len(trials)} trials checked; preparing datasets and starting Ray ...")
        # The trainer's name checks only apply to the trainer (tests and benchmarks run stand-ins).
        checker = ThreadPoolExecutor(max_workers=1).submit(_check_jobs, configs, prepare, target == DEFAULT_TARGET)

        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"   # step lines carry no knn_acc
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"    # our parquet files are the record
        # Tune keeps one trial PENDING ahead with a custom searcher: a trial that ends before a new
        # actor starts hands its actor to that one, and the sweep never runs more than one trial at
        # a time. max_concurrent pending trials let every slot get an actor.
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(spec.max_concurrent)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ["RAY_TMPDIR"] = _ray_tmpdir()
        Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
        import ray

        # Token authentication stays on: Ray turns it on for a new local cluster (when RAY_AUTH_MODE is
        # unset; setting the variable after Ray's import would not reach its C++ config) and warns
        # that it did: the console says it instead.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        port = _free_port(dashboard_port) if dashboard else None
        started_ray = False
        try:
            ray.init(
                address="local",
                # Logical CPUs only (trials ask for 0.01): enough for Ray to start max_concurrent
                # trial processes in parallel, never one per core of a big shared login node.
                num_cpus=min(os.cpu_count() or 2, max(2, spec.max_concurrent)),
                include_dashboard=bool(dashboard),
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                logging_level=logging.WARNING,
                log_to_driver=False,
                _temp_dir=os.environ["RAY_TMPDIR"],
                object_store_memory=100 * 2**20,
                # max_concurrent is a resource (each trial holds one slot), not Tune's concurrency
                # limit: with the limit Tune creates the next trial only once one has ended, so
                # the ended trial's actor is never cached and every trial starts a new process.
                resources={TRIAL_SLOT: spec.max_concurrent},
            )
            started_ray = True
            try:
                checker.result()
            except SweepError:
                raise
            output_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                stack.enter_context(_driver_lock(output_dir))
            return _run(spec, trials, output_dir.resolve(), sweep_id, partition, resume, port, target, target_kwargs,
                        analyze, console, live)
        finally:
            if started_ray:
                ray.shutdown()
            else:
                checker.cancel()


@contextlib.contextmanager
def _driver_lock(output_dir: Path):
    """One driver per sweep folder: a second one (a --resume while the first still runs) would
    hand out the same pending trials again."""
    path = output_dir / ".driver.lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise SweepError(f"another driver (pid {holder}) is running the sweep in {output_dir}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _run(spec, trials, output_dir: Path, sweep_id: str, partition, resume: bool, port, target,
         target_kwargs, analyze, console, live) -> SweepOutcome:
    import ray
    from ray import tune

    from ltssl.sweep.console import SweepBoard
    from ltssl.sweep.scheduler import GroupedASHA
    from ltssl.sweep.searcher import SweepSearcher
    from ltssl.sweep.trainable import JobTrial, TrialContext

    # ---------------------------------------------------------------- folder and ledger
    (output_dir / DETACH_MARKER).unlink(missing_ok=True)
    if not resume:
        atomic_write_text(output_dir / "sweep.yaml", spec.to_yaml())
        from ltssl.launch.submit import git_info

        meta = {"sweep_id": sweep_id, "name": spec.name, "source": spec.source, "partition": partition,
                "created": time.time(), "num_trials": len(trials), "metric": spec.metric, "mode": spec.mode,
                "target": target, "target_kwargs": target_kwargs or {}, **git_info()}
        atomic_write_text(output_dir / "sweep.json", json.dumps(meta, indent=1))
    outcome = SweepOutcome(output_dir=output_dir, sweep_id=sweep_id)

    scheduler = None
    if spec.scheduler.name == "asha":
        max_t = spec.scheduler.max_t or max(t.config["train"]["epochs"] for t in trials)
        scheduler = GroupedASHA(metric=spec.metric, mode=spec.mode, max_t=max_t,
                                grace_period=spec.scheduler.grace_period,
                                reduction_factor=spec.scheduler.reduction_factor)
    board = SweepBoard(spec.name, str(output_dir), spec.metric, spec.mode, len(trials), console=console, live=live)
    book = Bookkeeper(spec, output_dir, sweep_id, board)
    searcher = SweepSearcher(spec, output_dir, partition, metric=spec.metric, mode=spec.mode)

    if resume:
        console.print(f"resuming {output_dir}")
        counts = settle_unfinished(book, spec, scheduler)
        searcher = SweepSearcher(spec, output_dir, partition, metric=spec.metric, mode=spec.mode)
        console.print(
            f"  {counts['finished_while_away']} trial(s) finished while no driver ran, {counts['failed_while_away']} failed; "
            f"{counts['reattach']} job(s) to re-attach, {counts['resubmit']} trial(s) to resubmit on their run_dir "
            f"(from their checkpoints)"
        )
    for record in book.ledger.all():
        if record["status"] in RESULT_STATUSES:
            board.set_status(record["trial_id"], record["status"])
            if record["status"] == "completed":
                board.offer(record["group"], record["trial_id"], record.get("metric_value"), record.get("params") or {})
    book.write_results()

    # ---------------------------------------------------------------- console header
    where = f"Slurm partition {partition}" if partition else "local jobs (no --partition)"
    console.print(f"[bold]sweep {spec.name}[/bold]: {len(trials)} trials on {where}, at most {spec.max_concurrent} at once")
    console.print(f"  folder   {output_dir}")
    console.print(f"  results  {output_dir / 'results.parquet'} (rewritten as trials finish)")
    if port is not None:
        url = f"http://127.0.0.1:{port}"
        outcome.dashboard_url = url
        console.print(f"  dashboard {url}  (bound to 127.0.0.1; token authentication on)")
        console.print(f"    from a laptop: ssh -N -L {port}:127.0.0.1:{port} {_login()}")
        console.print(f"    then open {url} and paste the token from {token_location()}")

    remaining = searcher.remaining()
    if remaining == 0:
        console.print("every trial of this sweep is over: nothing to run")
    else:
        ctx = TrialContext(output_dir=str(output_dir), sweep_id=sweep_id, target=target,
                           target_kwargs=dict(target_kwargs or {}), poll_interval_s=spec.poll_interval_s)
        # Near-zero CPU: a trial only waits on its job. One slot of max_concurrent.
        trainable = tune.with_resources(tune.with_parameters(JobTrial, context=ctx), {"cpu": 0.01, TRIAL_SLOT: 1})
        run_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=remaining,
                # One actor serves trial after trial: no process start (about 1.2 s) and no
                # re-import per trial. Stopped trials' jobs are cancelled by the driver's
                # on_trial_complete (and by reset_config/cleanup in the actor as a backstop).
                reuse_actors=True,
                trial_name_creator=lambda t: t.config["trial_key"],
                trial_dirname_creator=lambda t: t.config["trial_key"],
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=str(output_dir / "tune"),
                verbose=0,
                callbacks=[_tune_callback(book, scheduler)],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
            ),
        )
        detached = {"flag": False}

        def on_sigterm(signum, frame):
            # Leave the jobs running: the trials' cleanup() sees the marker and does not cancel.
            detached["flag"] = True
            (output_dir / DETACH_MARKER).write_text(str(time.time()))
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
        # Tune logs every failed trial and a summary at ERROR level; the board reports them.
        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        board.start()
        try:
            tuner.fit()
        except KeyboardInterrupt:
            outcome.interrupted = "detached" if detached["flag"] else "cancelled"
        finally:
            board.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if outcome.interrupted is None and not detached["flag"]:
            # Tune's own SIGINT handler ends fit() without raising: trials it stopped are unfinished.
            if any(r["status"] in ("submitting", "running") for r in book.ledger.all()):
                outcome.interrupted = "cancelled"
        if detached["flag"]:
            outcome.interrupted = "detached"

    # ---------------------------------------------------------------- after Tune
    if outcome.interrupted == "detached":
        console.print(f"driver stopped (SIGTERM): jobs are left running; --resume --output-dir {output_dir} re-attaches "
                      "to those still running, records those that finished and resubmits the rest from their checkpoints")
    else:
        for record in book.ledger.all():
            if record["status"] in ("submitting", "running"):
                book.finish(record["trial_id"], "cancelled", cancel=True)
        book.wait_cancels()
        if outcome.interrupted == "cancelled":
            console.print(f"sweep interrupted: running jobs cancelled; continue with --resume --output-dir {output_dir}")
    outcome.results_path, outcome.metrics_path = book.write_results()
    outcome.counts = book.ledger.counts()
    print_results(outcome.results_path, spec, console)
    if analyze and outcome.interrupted != "detached":
        from ltssl.report import analyze as run_analysis

        outcome.report_dir = run_analysis(output_dir)
        console.print(f"report: {outcome.report_dir / 'report.md'} (tables and plots in {outcome.report_dir})")
    return outcome


def print_results(path: Path, spec: SweepSpec, console) -> None:
    """The results table: one line per trial, best first within each group."""
    import pandas as pd
    from rich.table import Table

    from ltssl.results import read_table
    from ltssl.sweep.spec import ALIASES

    df = read_table(path).to_pandas()
    if df.empty:
        console.print("no trial has finished")
        return
    axes: list[str] = []
    for text in df["params_json"]:
        axes += [k for k in json.loads(text) if k not in axes]
    short = {dotted: alias for alias, dotted in ALIASES.items()}
    asc = spec.mode == "min"
    metric = spec.metric if spec.metric in df.columns else "knn_acc"
    df = df.sort_values(["group", metric], ascending=[True, asc], na_position="last")
    table = Table(title=f"results ({len(df)} trials; {path})", box=None, header_style="bold")
    # "method.tase.enabled" -> "tase.enabled": the section is clear from the name, the width is not free
    columns = ["trial", "status", *[short.get(a, a.split(".", 1)[-1]) for a in axes], "epochs", metric]
    columns += [c for c in ("knn_acc", "linear_acc", "acc_few") if c != metric] + ["job"]
    for col in columns:
        table.add_column(col, no_wrap=True)
    for _, row in df.iterrows():
        params = json.loads(row["params_json"])

        def f(v):
            return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.4g}" if isinstance(v, float) else str(v))

        accs = [f(row[c]) for c in ("knn_acc", "linear_acc", "acc_few") if c != metric]
        table.add_row(row["trial_id"], row["status"], *[f(params.get(a)) for a in axes],
                      f(row["epochs_run"]), f(row[metric]), *accs, f(row["slurm_job_id"]))
    if console.is_terminal:
        console.print(table)
        return
    width, console.width = console.width, 240  # a log file has no width: do not cut the table to 80 columns
    try:
        console.print(table)
    finally:
        console.width = width
