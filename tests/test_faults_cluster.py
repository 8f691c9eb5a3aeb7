"""Cluster faults on the real local Slurm: daemons killed and restarted, accounting down, a job past
its memory limit, a state folder the user made. Each test restores what it broke (``finally``), so
the tests after it find a healthy cluster.

The decision these rely on (:func:`ltssl.launch.slurm_state.resolve`) is also checked on its own,
with observations written out, for the cases a real cluster cannot be made to show on demand
(a controller down for longer than the tolerated downtime, a job slurmctld has already forgotten).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from ltssl.config import load_config
from ltssl.launch import JobFailedError, JobHandle, SlurmJob, submit, toy
from ltssl.launch.slurm_state import ControllerClock, JobStatus, JobView, Observation, QueryError, observe, query_sacct, resolve
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster"
TOY = "ltssl.launch.toy:train"


def toy_cfg(**launch):
    launch = {"partition": "cpu", "timeout_min": 10, "signal_delay_s": 30, "mem_gb": 1, **launch}
    return load_config({"launch": launch})


def step_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"final"' not in line) if path.exists() else 0


def cluster(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(LOCAL_CLUSTER), *args], capture_output=True, text=True, timeout=180, env=env)
    if check:
        assert out.returncode == 0, f"local-cluster {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


@contextmanager
def daemon_down(name: str, kill: bool = True):
    """``name`` stopped for the block (``kill``: SIGKILL, a crash; else SIGTERM, a restart), then
    started again on its kept state; the cluster is whole again before the test goes on."""
    cluster("stop-daemon", name, *(["--kill"] if kill else []))
    try:
        yield
    finally:
        cluster("start-daemon", name)
        wait_until(lambda: cluster("status", check=False).returncode == 0, 120, f"the cluster to be whole again after {name}")
        wait_until(lambda: "idle" in nodes_states() or "mix" in nodes_states() or "alloc" in nodes_states(), 120, "the node to answer again")


def nodes_states() -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout


def forgotten_by_slurmctld(job_id: str) -> Observation:
    """The real observation of ``job_id``, as it is once slurmctld has purged the job (MinJobAge):
    squeue answers without it, and only sacct can tell."""
    real = observe([job_id])
    squeue = real.squeue if isinstance(real.squeue, QueryError) else {k: v for k, v in real.squeue.items() if k != job_id}
    return Observation(squeue, query_sacct([job_id]), real.time)


# ----------------------------------------------------------------------------- the decision alone


def at(t: float, squeue, sacct=None) -> Observation:
    return Observation(squeue, sacct, t)


def test_resolve_keeps_the_last_state_while_slurmctld_is_down_and_gives_up_after_the_tolerated_downtime():
    down = QueryError("squeue failed: slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    running = JobStatus("RUNNING", "n1")
    clock = ControllerClock()
    seen = at(0.0, {"7": JobView("RUNNING", "n1")})
    assert resolve("7", seen, unreachable_s=clock.unreachable_s(seen)) == running
    for t in (10.0, 300.0, 600.0):  # down, within the tolerated 600 s: the last state stands
        obs = at(t, down, QueryError("sacct failed: Connection refused"))
        assert resolve("7", obs, unreachable_s=clock.unreachable_s(obs), tolerated_s=600, last=running) == running
    obs = at(611.0, down, {})
    status = resolve("7", obs, unreachable_s=clock.unreachable_s(obs), tolerated_s=600, last=running)
    assert status.state == "RUNNING" and "\n" not in status.error
    assert status.error.startswith("slurmctld has not answered for 601 s (more than launch.controller_downtime_s=600)")
    assert "restart slurmctld, then --resume" in status.error
    # back: the clock restarts
    back = at(700.0, {"7": JobView("COMPLETED", "n1")})
    assert clock.unreachable_s(back) == 0.0 and resolve("7", back, last=running) == JobStatus("COMPLETED", "n1")
    # sacct's terminal answer is final even while slurmctld is down
    assert resolve("7", at(1.0, down, {"7": JobView("OUT_OF_MEMORY", "n1")}), last=running).state == "OUT_OF_MEMORY"


def test_resolve_never_ends_a_job_for_lack_of_accounting():
    sacct_down = QueryError("sacct failed: Problem talking to the database: Connection refused")
    # slurmctld still remembers the job: squeue's state, accounting not needed
    assert resolve("7", at(0, {"7": JobView("COMPLETED", "n1")}, None)).state == "COMPLETED"
    # slurmctld forgot it and accounting is down (or behind): unknown, not ended
    status = resolve("7", at(0, {}, sacct_down), last=JobStatus("RUNNING", "n1"))
    assert status == JobStatus("UNKNOWN", "n1") and status.error is None
    assert resolve("7", at(0, {}, {}), last=None) == JobStatus("UNKNOWN")
    # accounting back: resolved
    assert resolve("7", at(9, {}, {"7": JobView("FAILED", "n1")})).state == "FAILED"


# ----------------------------------------------------------------------------- faults on the real cluster


@pytest.mark.slurm
def test_slurmctld_killed_and_restarted_the_running_job_completes_and_its_handle_reports_success(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    # ~2 min of training: it outlasts the controller's downtime (each squeue then fails after 10-20 s)
    handle = submit(toy_cfg(), run_dir, target=TOY, target_kwargs={"steps": 480, "step_s": 0.25})
    wait_until(lambda: step_lines(run_dir) >= 3, 180, "the job to train")
    assert handle.state == "RUNNING"
    impatient = JobHandle.attach(run_dir)
    impatient.controller_downtime_s = 1.0
    # SIGTERM, as a restart does: slurmctld saves its state (a SIGKILL moments after a job started
    # may lose Slurm's own record of the start, and Slurm then starts the job twice and drains the node)
    with daemon_down("slurmctld", kill=False):
        before = step_lines(run_dir)
        wait_until(lambda: step_lines(run_dir) >= before + 8, 180, "the job to train on without its controller")
        # the handle keeps the last state it saw; nothing is declared ended or failed
        assert handle.state == "RUNNING" and handle.lost_reason is None
        # a handle that tolerates 1 s of downtime gives up, in one line naming the cause
        wait_until(lambda: impatient.state and impatient.lost_reason, 120, "the impatient handle to give up", poll=1.0)
        assert step_lines(run_dir) < 480, "the job ended before the impatient handle could be checked"
        with pytest.raises(JobFailedError) as info:
            impatient.result(timeout=600)
        assert "\n" not in str(info.value) and "slurmctld has not answered" in str(info.value)
        assert "launch.controller_downtime_s=1" in str(info.value)
    assert handle.result(timeout=600)["value"] == toy.expected_value(480)
    wait_until(lambda: handle.state == "COMPLETED", 120, "Slurm to record the end")
    assert handle.lost_reason is None
    # a fresh handle (a resumed driver) sees the job as it is
    assert JobHandle.attach(run_dir).state == "COMPLETED"


@pytest.mark.slurm
def test_accounting_down_states_come_from_squeue_and_an_ended_job_is_resolved_once_it_is_back(slurm_cluster, tmp_path):
    with daemon_down("slurmdbd"):
        ok = submit(toy_cfg(), tmp_path / "ok", target=TOY, target_kwargs={"steps": 6, "step_s": 0.1})
        bad = submit(toy_cfg(), tmp_path / "bad", target=TOY, target_kwargs={"steps": 50, "step_s": 0.1, "fail_at_step": 2})
        assert ok.result(timeout=300)["value"] == toy.expected_value(6)  # squeue alone: the job's state is known
        wait_until(lambda: bad.state == "FAILED", 300, "squeue to show the failed job")
        with pytest.raises(JobFailedError, match="toy failure at step 2"):
            bad.result(timeout=600)
        # once slurmctld has forgotten the job, only accounting can tell: unknown, never failed
        forgotten = SlurmJob(tmp_path / "bad", bad.job_id, submitted_at=bad.submitted_at, state_source=forgotten_by_slurmctld)
        assert forgotten.state == "UNKNOWN" and not forgotten.done() and forgotten.lost_reason is None
    wait_until(lambda: forgotten.state == "FAILED", 180, "accounting to record the failed job", poll=1.0)
    assert forgotten.done()
    with pytest.raises(JobFailedError, match="toy failure at step 2"):
        forgotten.result(timeout=600)


@pytest.mark.slurm
def test_a_job_past_its_memory_limit_fails_with_out_of_memory_and_the_others_complete(slurm_cluster, tmp_path):
    other = submit(toy_cfg(), tmp_path / "other", target=TOY, target_kwargs={"steps": 40, "step_s": 0.25})
    hog = submit(toy_cfg(mem_gb=0.25), tmp_path / "hog", target=TOY, target_kwargs={"steps": 400, "step_s": 0.25, "alloc_mb": 600})
    with pytest.raises(JobFailedError) as info:
        hog.result(timeout=600)
    summary = info.value.summary
    assert summary.startswith(f"job {hog.job_id} ended OUT_OF_MEMORY ("), summary
    assert "exceeded memory limit" in summary and "raise launch.mem_gb" in summary and "\n" not in summary
    # Slurm's own state: OUT_OF_MEMORY where cgroups enforce memory; FAILED where it is sampled (here)
    assert hog.state in ("OUT_OF_MEMORY", "FAILED")
    assert other.result(timeout=600)["value"] == toy.expected_value(40)


@pytest.mark.slurm
def test_local_cluster_up_in_a_private_folder_works_the_first_time_and_a_closed_parent_is_refused(slurm_cluster):
    """A state folder from ``mktemp -d`` (mode 0700): MariaDB runs as mysql and must enter it."""
    folder = Path(tempfile.mkdtemp(prefix="ltssl-fault-"))
    assert folder.stat().st_mode & 0o777 == 0o700
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "LTSSL_CLUSTER_DIR")}
    try:
        env["LTSSL_CLUSTER_DIR"] = str(folder)
        try:
            up = cluster("up", env=env, check=False)
            assert up.returncode == 0, f"up failed the first time:\n{up.stdout}\n{up.stderr}"
            status = cluster("status", env=env, check=False)
            assert status.returncode == 0 and "idle" in status.stdout, status.stdout
        finally:
            cluster("down", env=env, check=False)
        closed = folder / "closed"  # a folder below a 0700 parent that is not ours to open
        closed.mkdir(mode=0o700)
        env["LTSSL_CLUSTER_DIR"] = str(closed / "cluster")
        refused = cluster("up", env=env, check=False)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"local-cluster: error: user mysql cannot enter {closed / 'cluster'} (a folder above it lacks o+x): "
            "chmod o+x the folders above it, or set LTSSL_CLUSTER_DIR to a folder under /tmp"
        ]
        assert not list((closed / "cluster").iterdir()), "a refused up starts nothing and writes nothing"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
