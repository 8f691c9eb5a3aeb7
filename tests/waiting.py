"""Polling for the tests that watch jobs, clusters and sweeps from outside."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float, what: str, poll: float = 0.1):
    """Call ``predicate`` every ``poll`` s until it returns a truthy value, and return that value;
    fail the test naming ``what`` if ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
