"""The run of a sweep: Ray started on the login node, the driver's loop, Ctrl-C and SIGTERM, and the end.

:func:`start_ray` starts a local Ray (the dashboard on 127.0.0.1 when asked); :func:`run_tune`
then writes the sweep folder, settles a resumed sweep and runs the driver's loop
(:class:`~ltssl.sweep.loop.SweepLoop`: :class:`~ltssl.sweep.searcher.SweepSearcher` hands out
trials, :class:`~ltssl.sweep.scheduler.GroupedASHA` stops weak ones within their group, both
through Ray Tune's Searcher and TrialScheduler APIs; each trial is a job followed from the driver,
its end recorded by :class:`~ltssl.sweep.bookkeeping.Bookkeeper`) and finishes: remaining jobs
cancelled (or left running after SIGTERM), the parquet files, the results table and the report.

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
from ray.job_config import JobConfig

from ltssl.config import load_config
from ltssl.report import analyze
from ltssl.tracking import end_sweep_parent, sweep_parent
from ltssl.sweep.bookkeeping import Bookkeeper
from ltssl.sweep.console import SweepBoard
from ltssl.sweep.dashboard import print_dashboard
from ltssl.sweep.folder import prepare_folder
from ltssl.sweep.ledger import DETACH_MARKER
from ltssl.sweep.resume import report_resume, show_finished
from ltssl.sweep.raywatch import RayWatch
from ltssl.sweep.scheduler import GroupedASHA
from ltssl.sweep.searcher import SweepSearcher
from ltssl.sweep.loop import TRIAL_SLOT, SweepLoop
from ltssl.sweep.session import SweepOutcome, SweepRun
from ltssl.sweep.table import print_results
from ltssl.sweep.spec import SweepError

#: Attempts at starting Ray: its start-up wait is fixed (30 s for the raylet to register with the
#: GCS), which a loaded login node can miss once.
RAY_START_ATTEMPTS = 2


def start_ray(run: SweepRun) -> None:
    """A local Ray for this driver (no CPU, a small object store, max_concurrent trial slots).

    Raises SweepError (one line) when Ray does not start, after :data:`RAY_START_ATTEMPTS` tries.
    """
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            _init_ray(run)
            return
        except Exception as error:  # noqa: BLE001  (Ray raises a bare Exception for its start-up timeout)
            ray.shutdown()  # the processes of the failed start
            if attempt == RAY_START_ATTEMPTS:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise SweepError(f"Ray did not start on this machine ({RAY_START_ATTEMPTS} tries): {first} "
                                 "Nothing was submitted; run the command again when the machine is less loaded") from error


def _init_ray(run: SweepRun) -> None:
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
        # No CPU: nothing runs in a Ray worker (trials are followed by the driver itself), and with
        # CPUs Ray would start idle worker processes for them on the login node.
        num_cpus=0,
        include_dashboard=run.dashboard_port is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=run.dashboard_port,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        object_store_memory=100 * 2**20,
        # Each trial in flight holds one slot in a placement group named after it: the dashboard
        # shows the slots in use and the trials by name (ltssl.sweep.loop).
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


def make_loop(run: SweepRun, searcher: SweepSearcher, scheduler, book: Bookkeeper, watch: RayWatch) -> SweepLoop:
    return SweepLoop(book, searcher, scheduler, max_concurrent=run.spec.max_concurrent,
                     poll_interval_s=run.spec.poll_interval_s, target=run.target,
                     target_kwargs=dict(run.target_kwargs or {}), ray_lost=watch.check)


def fit(loop: SweepLoop, run: SweepRun, book: Bookkeeper) -> str | None:
    """Run the loop until every trial is over; None, or how the driver was stopped.

    Ctrl-C: "cancelled" (the jobs are cancelled afterwards). SIGTERM (a login node shutting down,
    or :class:`RayWatch` on a lost GCS or raylet): "detached": the jobs are left running, and the
    marker tells a resumed sweep why.
    """
    detached = threading.Event()

    def on_sigterm(signum, frame):
        detached.set()
        (run.output_dir / DETACH_MARKER).write_text(str(time.time()))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    interrupted = None
    book.board.start()
    try:
        loop.run()
    except KeyboardInterrupt:
        interrupted = "cancelled"
    finally:
        book.board.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if detached.is_set():
        return "detached"
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
    """After the loop: cancel what still runs (unless detached), write the files, print the table, the report."""
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
        outcome.interrupted = fit(make_loop(run, searcher, scheduler, book, watch), run, book)
        if watch.check():
            outcome.interrupted = "ray_lost"
        finish(run, book, outcome)
        close_tracking_parent(tracking, run, outcome)
    finally:
        watch.stop()
        if watch.lost:
            watch.abandon()  # does not return: ray.shutdown() would wait on the dead GCS
    return outcome
