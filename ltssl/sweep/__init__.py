"""Sweeps: Ray Tune over a training config's hyperparameters, one Slurm (or local) job per trial.

```python
from ltssl.sweep import load_sweep, run_sweep, SweepError
spec = load_sweep("sweeps/cifar10_lt/rwsam.yaml")     # checked; SweepError names the key
outcome = run_sweep("sweeps/digits_lt/default.yaml", partition=None)   # local jobs
outcome.output_dir / "results.parquet"
```

Modules: :mod:`~ltssl.sweep.spec` (the YAML format, validation, trial planning),
:mod:`~ltssl.sweep.driver` (Ray start-up, Tune, resume, the end), :mod:`~ltssl.sweep.trainable`
(one trial = one job, tailed), :mod:`~ltssl.sweep.scheduler` (ASHA per group),
:mod:`~ltssl.sweep.searcher` (plan / Optuna TPE), :mod:`~ltssl.sweep.ledger` (the resume record),
:mod:`~ltssl.sweep.console` (live table), :mod:`~ltssl.sweep.prepare` (preflight and datasets).
Importing this package does not import Ray.
"""

from ltssl.sweep.spec import SweepError, SweepSpec, load_sweep

__all__ = ["SweepError", "SweepSpec", "load_sweep", "run_sweep"]


def run_sweep(*args, **kwargs):
    """See :func:`ltssl.sweep.driver.run_sweep` (imported on first use: it brings Ray in)."""
    from ltssl.sweep.driver import run_sweep as _run_sweep

    return _run_sweep(*args, **kwargs)
