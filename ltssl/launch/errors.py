"""Errors of the launch layer: one line for refusals, the remote traceback for failures."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A job cannot be submitted, or did not produce a result.

    Refusals before submission (preflight) are one line naming the offending key or resource.
    """


class JobCancelledError(LaunchError):
    """The job was cancelled (``JobHandle.cancel()`` or ``scancel``): "job <id> was cancelled"."""


class JobFailedError(LaunchError):
    """The job raised, or Slurm ended it (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY ...).

    ``str(error)`` starts with one summary line, then the remote traceback (or the tail of the
    job's stderr when the job died without one); ``error.remote_traceback`` holds it alone.
    """

    def __init__(self, message: str, remote_traceback: str | None = None) -> None:
        super().__init__(message if not remote_traceback else f"{message}\n{remote_traceback}")
        self.summary = message
        self.remote_traceback = remote_traceback
