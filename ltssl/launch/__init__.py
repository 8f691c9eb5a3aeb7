"""Launching training jobs: locally or on Slurm through submitit, preemptible and cancellable.

```python
from ltssl.launch import submit, preflight, LaunchError, TrainJob, JobHandle
handle = submit(cfg, "runs/x")      # preflight, then one job (cfg.launch.partition None -> local)
handle.state, handle.done(), handle.result(), handle.cancel(), handle.node_list
JobHandle.attach("runs/x")         # the same job from another process (job.json)
```

A handle is a :class:`SlurmJob` (squeue/sacct, tolerant of a restarting slurmctld or a down
accounting database: :mod:`ltssl.launch.slurm_state`) or a :class:`LocalJob` (the job's processes).
"""

from ltssl.launch.errors import JobCancelledError, JobFailedError, LaunchError
from ltssl.launch.handle import JobHandle
from ltssl.launch.job import DEFAULT_TARGET, REPO_ROOT, TrainJob
from ltssl.launch.local_job import LocalJob
from ltssl.launch.preflight import preflight
from ltssl.launch.slurm_job import SlurmJob
from ltssl.launch.submit import make_executor, submit

__all__ = [
    "DEFAULT_TARGET",
    "JobCancelledError",
    "JobFailedError",
    "JobHandle",
    "LaunchError",
    "LocalJob",
    "REPO_ROOT",
    "SlurmJob",
    "TrainJob",
    "make_executor",
    "preflight",
    "submit",
]
