"""Shared test fixtures: the real local Slurm cluster, and "a skip is a failure" under CI.

`make test` brings the cluster up before pytest (scripts/test.sh); a bare `pytest` run brings
it up itself through the same script on the first test that needs it. If Slurm cannot come up
the tests that need it fail, loudly: they are never skipped.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test is reported as failed: a missing Slurm or FFCV must not pass."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def _cluster(nodes: int) -> dict[str, str]:
    """Bring the local cluster up with ``nodes`` nodes (idempotent) and export its environment."""
    if not LOCAL_CLUSTER.exists():
        pytest.fail(f"{LOCAL_CLUSTER} is missing: the local Slurm cluster cannot be started")
    up = subprocess.run([str(LOCAL_CLUSTER), "up", "--nodes", str(nodes)], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"slurm/local-cluster up --nodes {nodes} failed:\n{up.stdout}\n{up.stderr}")
    env_out = subprocess.run([str(LOCAL_CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    exported = {}
    for line in env_out.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            exported[key] = shlex.split(value)[0] if value else ""
    os.environ.update(exported)
    return exported


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """The one-node local Slurm cluster (partitions cpu and gpu); returns the exported environment."""
    return _cluster(1)


@pytest.fixture(scope="session")
def two_node_cluster() -> dict[str, str]:
    """The two-node local Slurm cluster (network namespaces); returns the exported environment."""
    return _cluster(2)
