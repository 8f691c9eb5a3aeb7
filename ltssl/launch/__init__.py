"""Launching training jobs: locally or on Slurm through submitit, preemptible and cancellable.

```python
from ltssl.launch import submit, preflight, LaunchError, TrainJob, JobHandle
handle = submit(cfg, "runs/x")      # preflight, then one job (cfg.launch.partition None -> local)
handle.state, handle.done(), handle.result(), handle.cancel(), handle.node_list
JobHandle.attach("runs/x")         # the same job from another process (job.json)
```
"""

from ltssl.launch.errors import JobCancelledError, JobFailedError, LaunchError
from ltssl.launch.job import TrainJob
from ltssl.launch.preflight import preflight
from ltssl.launch.submit import JobHandle, make_executor, submit

__all__ = [
    "JobCancelledError",
    "JobFailedError",
    "JobHandle",
    "LaunchError",
    "TrainJob",
    "make_executor",
    "preflight",
    "submit",
]
