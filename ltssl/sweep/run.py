"""The Tune run of a sweep: Ray started on the login node, the Tuner, Ctrl-C and SIGTERM, and the end.

:func:`start_ray` starts a local Ray (the dashboard on 127.0.0.1 when asked); :func:`run_tune`
then writes the sweep folder, settles a resumed sweep, runs Tune
(:class:`~ltssl.sweep.searcher.SweepSearcher` hands out trials,
:class:`~ltssl.sweep.scheduler.GroupedASHA` stops weak ones within their group,
:class:`~ltssl.sweep.trainable.JobTrial` runs each as a job, :class:`~ltssl.sweep.callback.SweepCallback`
records their ends) and finishes: remaining jobs cancelled (or left running after SIGTERM), the
parquet files, the results table and the report.

This module imports Ray: :func:`ltssl.sweep.driver.run_sweep` imports it once Ray's environment
is set (:func:`ltssl.sweep.dashboard.set_ray_environment`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import ray
from ray import tune
from ray.job_config import JobConfig

from ltssl.config import load_config
from ltssl.report import analyze
from ltssl.tracking import end_sweep_parent, sweep_parent
from ltssl.sweep.bookkeeping import Bookkeeper
from ltssl.sweep.callback import SweepCallback
from ltssl.sweep.console import SweepBoard
from ltssl.sweep.dashboard import print_dashboard
from ltssl.sweep.folder import prepare_folder
from ltssl.sweep.ledger import DETACH_MARKER
from ltssl.sweep.resume import report_resume, show_finished
from ltssl.sweep.raywatch import RayWatch
from ltssl.sweep.scheduler import GroupedASHA
from ltssl.sweep.searcher import SweepSearcher
from ltssl.sweep.session import SweepOutcome, SweepRun
from ltssl.sweep.table import print_results
from ltssl.sweep.trainable import TrialContext, trial_class

#: Ray resource that bounds the trials running at once (one per trial, max_concurrent in all).
TRIAL_SLOT = "sweep_trial_slot"


def start_ray(run: SweepRun) -> None:
    """A local Ray for this driver: logical CPUs only, a small object store, max_concurrent trial slots."""
    # Token authentication stays on: Ray turns it on for a new local cluster (when RAY_AUTH_MODE is
    # unset; setting the variable after Ray's import would not reach its C++ config) and warns
    # that it did: the console says it instead.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address="local",
        # The dashboard's Jobs page and its API (/api/jobs/) name the driver's job by the sweep
        # ("job_name" is the metadata key Ray's own job submission uses for a job's name).
        job_config=JobConfig(metadata=job_metadata(run)),
        namespace=f"ltssl-sweep-{run.sweep_id}",
        # Logical CPUs only (trials ask for 0.01): enough for Ray to start max_concurrent
        # trial processes in parallel, never one per core of a big shared login node.
        num_cpus=min(os.cpu_count() or 2, max(2, run.spec.max_concurrent)),
        include_dashboard=run.dashboard_port is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=run.dashboard_port,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        object_store_memory=100 * 2**20,
        # max_concurrent is a resource (each trial holds one slot), not Tune's concurrency
        # limit: with the limit Tune creates the next trial only once one has ended, so
        # the ended trial's actor is never cached and every trial starts a new process.
        resources={TRIAL_SLOT: run.spec.max_concurrent},
    )


def job_metadata(run: SweepRun) -> dict[str, str]:
    """What Ray records about the driver's job (strings only): the sweep's name, id and folder."""
    return {"job_name": f"sweep {run.spec.name} ({run.sweep_id})", "sweep_name": run.spec.name,
            "sweep_id": run.sweep_id, "sweep_dir": str(run.output_dir.resolve()),
            "partition": run.partition or "local jobs", "trials": str(len(run.trials))}


def stop_ray() -> None:
    ray.shutdown()


def make_scheduler(run: SweepRun) -> GroupedASHA | None:
    """ASHA within each comparison group, or None (``scheduler: none``)."""
    spec = run.spec
    if spec.scheduler.name != "asha":
        return None
    max_t = spec.scheduler.max_t or max(t.config["train"]["epochs"] for t in run.trials)
    return GroupedASHA(metric=spec.metric, mode=spec.mode, max_t=max_t,
                       grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor)


def print_header(run: SweepRun) -> str | None:
    """Where the trials run, the folder, the results file and the dashboard; the dashboard's URL."""
    console, spec = run.console, run.spec
    where = f"Slurm partition {run.partition}" if run.partition else "local jobs (no --partition)"
    console.print(f"[bold]sweep {spec.name}[/bold]: {len(run.trials)} trials on {where}, at most {spec.max_concurrent} at once")
    console.print(f"  folder   {run.output_dir}")
    console.print(f"  results  {run.output_dir / 'results.parquet'} (rewritten as trials finish)")
    return print_dashboard(console, run.dashboard_port) if run.dashboard_port is not None else None


def make_tuner(run: SweepRun, searcher: SweepSearcher, scheduler, book: Bookkeeper, num_samples: int,
               watch: RayWatch) -> tune.Tuner:
    ctx = TrialContext(output_dir=str(run.output_dir), sweep_id=run.sweep_id, target=run.target,
                       target_kwargs=dict(run.target_kwargs or {}), poll_interval_s=run.spec.poll_interval_s)
    # Near-zero CPU: a trial only waits on its job. One slot of max_concurrent. The class keeps the
    # name JobTrial in Ray's dashboard (tune.with_resources would rename it ResourceTrainable).
    trainable = trial_class(ctx, {"cpu": 0.01, TRIAL_SLOT: 1})
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            # One actor per trial: Ray's dashboard shows an actor's repr (its trial, group and
            # parameters) as taken when the actor starts, so a reused actor would go on naming its
            # first trial. Stopped trials' jobs are cancelled by the driver's on_trial_complete
            # (and by cleanup in the actor as a backstop).
            reuse_actors=False,
            trial_name_creator=lambda t: t.config["trial_key"],
            trial_dirname_creator=lambda t: t.config["trial_key"],
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(run.output_dir / "tune"),
            verbose=0,
            callbacks=[SweepCallback(book, scheduler, ray_lost=watch.check)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )


def fit(tuner: tune.Tuner, run: SweepRun, book: Bookkeeper) -> str | None:
    """Run Tune until every trial is over; None, or how the driver was stopped.

    Ctrl-C: "cancelled" (the jobs are cancelled afterwards). SIGTERM (a login node shutting down,
    or :class:`RayWatch` on a lost GCS or raylet): "detached": the marker tells the trials'
    cleanup() to leave their jobs running.
    """
    detached = threading.Event()

    def on_sigterm(signum, frame):
        detached.set()
        (run.output_dir / DETACH_MARKER).write_text(str(time.time()))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    # Tune logs every failed trial and a summary at ERROR level; the board reports them.
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    interrupted = None
    book.board.start()
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = "cancelled"
    finally:
        book.board.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if detached.is_set():
        return "detached"
    # Tune's own SIGINT handler ends fit() without raising: trials it stopped are unfinished.
    if interrupted is None and any(r["status"] in ("submitting", "running") for r in book.ledger.all()):
        interrupted = "cancelled"
    return interrupted


def open_tracking_parent(run: SweepRun):
    """MLflow's parent run of the sweep, when its trials log to MLflow (their runs nest under it);
    the trials' tracking config, or None without trials. Tracker errors are logged, never raised."""
    if not run.trials:
        return None
    cfg = load_config(run.trials[0].config)
    spec = run.spec
    sweep_parent(cfg, run.output_dir, {"sweep": spec.name, "metric": spec.metric, "mode": spec.mode,
                                       "num_trials": len(run.trials), "partition": run.partition or "local jobs"})
    return cfg


def close_tracking_parent(cfg, run: SweepRun, outcome: SweepOutcome) -> None:
    """End the parent run when the sweep is over (FINISHED) or was stopped by Ctrl-C (KILLED); after
    SIGTERM or a lost Ray the jobs run on and a resumed sweep continues the same parent run."""
    if cfg is not None and outcome.interrupted in (None, "cancelled"):
        end_sweep_parent(cfg, run.output_dir, "FINISHED" if outcome.interrupted is None else "KILLED")


def finish(run: SweepRun, book: Bookkeeper, outcome: SweepOutcome) -> SweepOutcome:
    """After Tune: cancel what still runs (unless detached), write the files, print the table, the report."""
    console, output_dir = run.console, run.output_dir
    if outcome.interrupted == "ray_lost":
        pass  # the jobs run on; RayWatch.abandon says so
    elif outcome.interrupted == "detached":
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
    print_results(outcome.results_path, run.spec, console)
    if run.analyze and outcome.interrupted not in ("detached", "ray_lost"):
        outcome.report_dir = analyze(output_dir)
        console.print(f"report: {outcome.report_dir / 'report.md'} (tables and plots in {outcome.report_dir})")
    return outcome


def run_tune(run: SweepRun) -> SweepOutcome:
    """Run (or resume) the sweep ``run`` describes, with Ray started; see the module docstring."""
    prepare_folder(run)
    tracking = open_tracking_parent(run)
    outcome = SweepOutcome(output_dir=run.output_dir, sweep_id=run.sweep_id)
    scheduler = make_scheduler(run)
    board = SweepBoard(run.spec.name, str(run.output_dir), run.spec.metric, run.spec.mode, len(run.trials),
                       console=run.console, live=run.live)
    book = Bookkeeper(run.spec, run.output_dir, run.sweep_id, board)
    if run.resume:
        report_resume(book, scheduler, run.console, run.output_dir)
    show_finished(book)
    book.write_results()
    outcome.dashboard_url = print_header(run)
    # Built once, after a resumed sweep is settled: it reads the ledger (TPE rebuilds its studies from it).
    searcher = SweepSearcher(run.spec, run.output_dir, run.partition, metric=run.spec.metric, mode=run.spec.mode)
    remaining = searcher.remaining()
    if remaining == 0:
        run.console.print("every trial of this sweep is over: nothing to run")
        close_tracking_parent(tracking, run, finish(run, book, outcome))
        return outcome
    watch = RayWatch(run.output_dir)
    watch.start()
    try:
        outcome.interrupted = fit(make_tuner(run, searcher, scheduler, book, remaining, watch), run, book)
        if watch.check():
            outcome.interrupted = "ray_lost"
        finish(run, book, outcome)
        close_tracking_parent(tracking, run, outcome)
    finally:
        watch.stop()
        if watch.lost:
            watch.abandon()  # does not return: ray.shutdown() would wait on the dead GCS
    return outcome
