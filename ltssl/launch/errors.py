"""Errors of the launch layer: one line for refusals, the remote traceback for failures."""

from __future__ import annotations

import re

#: a traceback's last exception line: ``ValueError: boom``, ``submitit.core.utils.UncompletedJobError``, ``KeyboardInterrupt``
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(: .*)?")
SUMMARY_MAX_CHARS = 500  # the exception's line as the summary carries it (the traceback keeps it whole)


class LaunchError(RuntimeError):
    """A job cannot be submitted, or did not produce a result.

    Refusals before submission (preflight) are one line naming the offending key or resource.
    """


class JobCancelledError(LaunchError):
    """The job was cancelled (``JobHandle.cancel()`` or ``scancel``): "job <id> was cancelled"."""


def exception_line(traceback: str | None) -> str | None:
    """The ``Type: message`` line a Python traceback ends with (the first line of a multi-line
    message), or None when ``traceback`` holds no traceback (e.g. the tail of a log)."""
    if not traceback or "Traceback (most recent call last):" not in traceback:
        return None
    lines = traceback.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    start = frames[-1] + 1 if frames else lines.index(next(x for x in lines if x.startswith("Traceback"))) + 1
    for line in lines[start:]:  # the frame's source lines are indented; the exception's is not
        if line and not line[0].isspace() and _EXCEPTION_LINE.fullmatch(line):
            return line if len(line) <= SUMMARY_MAX_CHARS else line[: SUMMARY_MAX_CHARS - 1] + "…"
    return None


class JobFailedError(LaunchError):
    """The job raised, or Slurm ended it (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY ...).

    ``str(error)`` starts with one summary line (:attr:`summary`), then the remote traceback (or
    the tail of the job's stderr when the job died without one); ``error.remote_traceback`` holds
    it alone. A ``message`` that ends with ``:`` introduces the remote text; when that text is a
    Python traceback, the summary ends with the exception it ends with, so the first line says
    what failed: ``job 7 failed (task 0): ValueError: boom``.
    """

    def __init__(self, message: str, remote_traceback: str | None = None) -> None:
        raised = exception_line(remote_traceback) if message.endswith(":") else None
        summary = f"{message} {raised}" if raised else message
        super().__init__(summary if not remote_traceback else f"{summary}\n{remote_traceback}")
        self.summary = summary
        self.remote_traceback = remote_traceback
