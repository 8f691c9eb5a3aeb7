"""Sweeps: Ray Tune over a training config's hyperparameters, one Slurm (or local) job per trial.

```python
from ltssl.sweep import load_sweep, run_sweep, SweepError
spec = load_sweep("sweeps/cifar10_lt/rwsam.yaml")     # checked; SweepError names the key
outcome = run_sweep("sweeps/digits_lt/default.yaml", partition=None)   # local jobs
outcome.output_dir / "results.parquet"
```

Modules: :mod:`~ltssl.sweep.spec` (the YAML format, validation, trial planning),
:mod:`~ltssl.sweep.driver` (:func:`run_sweep`: checks, Ray start-up, the run),
:mod:`~ltssl.sweep.session` (the run's dataclass and outcome), :mod:`~ltssl.sweep.folder` (new or
resumed sweep folder, the one-driver lock), :mod:`~ltssl.sweep.checks` (preflight; datasets via
:mod:`~ltssl.sweep.prepare` in a child process), :mod:`~ltssl.sweep.dashboard` (Ray's temp dir,
dashboard port, token, ssh hint), :mod:`~ltssl.sweep.run` (Ray, signals, the end),
:mod:`~ltssl.sweep.raywatch` (the driver's GCS server and raylet: a loss stops it in one line),
:mod:`~ltssl.sweep.loop` (the driver's loop: searcher, ASHA, every trial's job followed),
:mod:`~ltssl.sweep.trial` (one trial = one job, its metrics tailed), :mod:`~ltssl.sweep.bookkeeping`
(trial ends: ledger, parquet, console), :mod:`~ltssl.sweep.resume` (settling a resumed sweep),
:mod:`~ltssl.sweep.table` (the results table),
:mod:`~ltssl.sweep.scheduler` (ASHA per group), :mod:`~ltssl.sweep.searcher` (plan / Optuna TPE),
:mod:`~ltssl.sweep.ledger` (the resume record), :mod:`~ltssl.sweep.console` (live table).
Importing this package does not import Ray (only :mod:`~ltssl.sweep.run` and the modules it
uses do, once the driver has set Ray's environment).
"""

from ltssl.sweep.spec import SweepError, SweepSpec, load_sweep
from ltssl.sweep.driver import run_sweep

__all__ = ["SweepError", "SweepSpec", "load_sweep", "run_sweep"]
