"""The sweep driver: Ray Tune's searcher and ASHA where the user types the command, one Slurm (or local) job per trial.

:func:`run_sweep` does, in order:

1. read and check the sweep (:func:`ltssl.sweep.spec.load_sweep`) and every trial config it can
   generate, new or resumed (:mod:`ltssl.sweep.folder`); then preflight every distinct job shape
   and, in a child process, prepare every dataset (:mod:`ltssl.sweep.checks`). Any refusal is one
   line and nothing is submitted;
2. start Ray locally (short ``RAY_TMPDIR``, quiet console; the dashboard on 127.0.0.1 with Ray's
   token authentication when asked: :mod:`ltssl.sweep.dashboard`);
3. create the output folder (``sweep.yaml``, ``sweep.json``, ``ledger/``, ``trials/``), or on
   ``resume`` read it back and settle what happened while no driver ran (:mod:`ltssl.sweep.resume`),
   and run the driver's loop (:mod:`ltssl.sweep.run`, :mod:`ltssl.sweep.loop`): trials follow
   their jobs from the driver itself, one batched Slurm query for all of them per interval;
4. as each trial ends, write its status to the ledger, cancel its job if it still runs, and
   add its rows to ``results.parquet`` and ``metrics.parquet`` (:mod:`ltssl.sweep.bookkeeping`);
5. at the end print the results table (:mod:`ltssl.sweep.table`) and write the analysis report.

Ctrl-C stops the sweep: running jobs are cancelled (they checkpoint on SIGTERM) and their trials
recorded ``cancelled``; ``--resume`` continues them. SIGTERM (a login node shutting down) leaves
the jobs running and ``--resume`` re-attaches to them; so does the loss of the driver's Ray GCS
server or raylet (:mod:`ltssl.sweep.raywatch`: one line, exit status 75).

Importing this module does not import Ray (``launch/sweep.py --dry-run`` and the spec checks
stay light): :mod:`ltssl.sweep.run` is imported once Ray's environment is set.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor

from ltssl.launch.job import DEFAULT_TARGET
from ltssl.launch.local import share_cpus_among_jobs
from ltssl.sweep.checks import check_jobs, quick_preflight
from ltssl.sweep.console import default_console
from ltssl.sweep.dashboard import free_port, set_ray_environment
from ltssl.sweep.folder import DEFAULT_SWEEP, check_still_new, driver_lock, open_new, open_resumed
from ltssl.sweep.session import SweepOutcome, SweepRun
from ltssl.sweep.spec import SweepError

__all__ = ["DEFAULT_SWEEP", "SweepOutcome", "SweepRun", "run_sweep"]


def _start_checks(run: SweepRun, prepare: bool) -> Future:
    """Check every trial config of ``run`` (into ``run.trials``) and the quick preflight, here and now;
    return the child process's checks and dataset preparation, which overlap with Ray's start-up."""
    run.trials = run.spec.validate_trials(run.partition)
    configs = [t.config for t in run.trials]
    quick_preflight(configs)  # dataset folders, partition, resources
    run.console.print(f"sweep {run.spec.name}: {len(run.trials)} trials checked; preparing datasets and starting Ray ...")
    # The trainer's name checks only apply to the trainer (tests and benchmarks run stand-ins).
    return ThreadPoolExecutor(max_workers=1).submit(check_jobs, configs, prepare, run.target == DEFAULT_TARGET)


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
    tracking: dict | None = None,
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
        tracking: keys of the ``tracking`` config section set for every trial of a new sweep
            (a resumed sweep keeps the trackers it started with).
    """
    if resume:
        if tracking:
            raise SweepError("--wandb/--mlflow: a resumed sweep keeps the trackers in its sweep.yaml; resume without them")
        run = open_resumed(config, output_dir, partition, target, target_kwargs)
    else:
        run = open_new(config, output_dir, partition, target, target_kwargs, tracking=tracking)
    run.console = console or default_console()
    run.live, run.analyze = live, analyze
    with contextlib.ExitStack() as stack:
        if resume:
            stack.enter_context(driver_lock(run.output_dir))  # before anything starts
        if max_concurrent is not None:
            if max_concurrent < 1:
                raise SweepError(f"--max-concurrent must be >= 1, got {max_concurrent}")
            run.spec.max_concurrent = max_concurrent
        if run.partition is None:  # the trials' jobs share this machine
            share_cpus_among_jobs(run.spec.max_concurrent)
        checker = _start_checks(run, prepare)
        set_ray_environment()
        # Deferred on purpose: Ray and Tune read the environment set just above when they are
        # imported, and importing this module must not import Ray (see the module docstring).
        from ltssl.sweep import run as tune_run

        if dashboard if dashboard is not None else run.partition is not None:
            run.dashboard_port = free_port(dashboard_port)
        started_ray = False
        try:
            tune_run.start_ray(run)
            started_ray = True
            checker.result()
            run.output_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                stack.enter_context(driver_lock(run.output_dir))
                check_still_new(run)  # a driver started on the same folder may have got there first
            run.output_dir = run.output_dir.resolve()
            return tune_run.run_tune(run)
        finally:
            if started_ray:
                tune_run.stop_ray()
            else:
                checker.cancel()
