"""The launch layer on the real local Slurm cluster (slurm/local-cluster): never a mock.

Real-trainer jobs (sweeps/digits_lt/train.yaml, shortened) check DDP and an interrupted run that
must end exactly where an uninterrupted one does; the toy trainer (``ltssl.launch.toy``, a
deterministic integer recurrence with the trainer's checkpoint contract) checks the time-limit
signal, cancellation, failures and the CLI cheaply.

Slurm's time-limit enforcement takes one to two minutes, so that job is submitted by a module
fixture when the first test starts and checked by the last test, while the others run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltssl.config import load_config
from ltssl.data import prepare_dataset
from ltssl.launch import JobCancelledError, JobFailedError, JobHandle, LaunchError, submit
from ltssl.launch import toy
from waiting import wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TRAIN_YAML = REPO / "sweeps" / "digits_lt" / "train.yaml"
TOY = "ltssl.launch.toy:train"
# Latencies seen by these tests (printed at the end with -s, and kept for the report).
MEASURED: dict[str, float] = {}


# ----------------------------------------------------------------------------- helpers


def toy_cfg(**launch):
    launch = {"partition": "cpu", "timeout_min": 10, "signal_delay_s": 30, "mem_gb": 1, **launch}
    return load_config({"launch": launch})


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """The digits-LT dataset prepared once for every real-trainer job of this module."""
    cache = tmp_path_factory.mktemp("data")
    prepare_dataset(load_config(TRAIN_YAML, {"data.cache_dir": str(cache)}).data)
    return cache


def real_cfg(cache: Path, overrides: dict | None = None, **launch):
    """sweeps/digits_lt/train.yaml on the cpu partition, shortened for tests."""
    launch = {"partition": "cpu", "timeout_min": 30, "signal_delay_s": 30, "mem_gb": 2, **launch}
    base = {"data.cache_dir": str(cache), "train.device": "cpu", "eval.linear_epochs": 2}
    base.update({f"launch.{k}": v for k, v in launch.items()})
    base.update(overrides or {})
    return load_config(TRAIN_YAML, base)


def step_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line and '"final"' not in line)


def attempts(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "job.json").read_text()).get("attempts", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def live_pids(run_dir: Path) -> list[int]:
    """Processes the toy trainer recorded that still exist (zombies excluded)."""
    alive = []
    for path in (run_dir / "pids").glob("rank*"):
        pid = int(path.read_text())
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def comparable(result: dict) -> dict:
    """A result without its wall-clock fields."""
    return {k: v for k, v in result.items() if k not in ("train_time_s",)}


@pytest.fixture(scope="module")
def time_limit_job(slurm_cluster, tmp_path_factory):
    """A ~70 s toy job under a 1-minute limit: Slurm's USR2 (45 s before the limit) must make it
    checkpoint and requeue itself, and the requeued attempt resume, until it completes."""
    run_dir = tmp_path_factory.mktemp("time-limit") / "run"
    cfg = toy_cfg(timeout_min=1, signal_delay_s=45, max_num_timeout=10)
    handle = submit(cfg, run_dir, target=TOY, target_kwargs={"steps": 140, "step_s": 0.5, "checkpoint_every": 10**6})
    return handle


# ----------------------------------------------------------------------------- tests


def test_ddp_two_tasks_on_cpu_partition_returns_rank0_result(slurm_cluster, time_limit_job, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    cfg = real_cfg(data_cache, {"train.epochs": 1}, tasks_per_node=2)
    submitted = time.monotonic()
    handle = submit(cfg, run_dir)
    submit_s = time.monotonic() - submitted
    wait_until(lambda: handle.state != "PENDING", 60, "the job to start", poll=0.05)
    MEASURED["slurm_submit_call_s"] = submit_s
    MEASURED["slurm_submit_to_start_s"] = time.monotonic() - submitted
    result = handle.result(timeout=900)
    assert result["world_size"] == 2 and result["epochs_run"] == 1
    assert 0.0 <= result["knn_acc"] <= 1.0
    record = json.loads((run_dir / "job.json").read_text())
    assert record["executor"] == "slurm" and record["partition"] == "cpu" and record["job_id"] == handle.job_id
    assert record["node_list"] == handle.node_list == os.uname().nodename.split(".")[0]
    assert record["attempts"][0]["num_tasks"] == 2 and len(record["git_commit"]) == 40
    for name in ("config.yaml", "metrics.jsonl", "result.json", "checkpoints/last.pt"):
        assert (run_dir / name).exists(), name
    for task in (0, 1):
        assert handle.paths(task).stdout.exists()
    # the result file comes first; Slurm records the end a moment later
    assert wait_until(lambda: handle.state == "COMPLETED", 30, "Slurm to record COMPLETED", poll=0.2)


def test_requeued_job_resumes_and_matches_uninterrupted_run(slurm_cluster, data_cache, tmp_path):
    """scontrol requeue (SIGTERM: checkpoint, exit, requeue) and then a preemption signal
    (USR2: checkpoint_now, self-requeue) mid-training; the result equals an uninterrupted run's."""
    overrides = {"train.epochs": 2, "train.log_every": 1}
    reference = submit(real_cfg(data_cache, overrides), tmp_path / "uninterrupted")
    run_dir = tmp_path / "interrupted"
    handle = submit(real_cfg(data_cache, overrides), run_dir)

    wait_until(lambda: step_lines(run_dir) >= 2, 600, "2 training steps")
    subprocess.run(["scontrol", "requeue", handle.job_id], check=True)
    requeued_at = time.monotonic()
    wait_until(lambda: attempts(run_dir) >= 2, 120, "the requeued attempt to start")
    MEASURED["slurm_requeue_to_restart_s"] = time.monotonic() - requeued_at
    # counted once the first attempt is over: its last steps (before SIGTERM took) are not the second's
    lines_before = step_lines(run_dir)
    wait_until(lambda: step_lines(run_dir) >= lines_before + 2, 600, "2 more steps in the second attempt")
    assert handle.state == "RUNNING", "the job ended before the preemption signal could be sent"
    subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True)
    wait_until(lambda: attempts(run_dir) >= 3, 120, "the self-requeued attempt to start")

    result = handle.result(timeout=900)
    expected = reference.result(timeout=900)
    assert comparable(result) == comparable(expected)
    record = json.loads((run_dir / "job.json").read_text())
    assert [a["restart"] for a in record["attempts"]] == [0, 1, 2]
    log = handle.paths(0).stdout.read_text()
    assert "ltssl: SIGTERM: checkpoint saved" in log and "ltssl: preemption signal: checkpoint saved" in log


@pytest.mark.parametrize("how", ["JobHandle.cancel", "scancel"])
def test_cancel_ends_the_job_and_leaves_no_process(slurm_cluster, tmp_path, how):
    run_dir = tmp_path / "run"
    handle = submit(toy_cfg(tasks_per_node=2), run_dir, target=TOY, target_kwargs={"steps": 10**6, "step_s": 0.05})
    wait_until(lambda: step_lines(run_dir) >= 3, 120, "the job to make progress")
    assert len(live_pids(run_dir)) == 2
    started = time.monotonic()
    if how == "JobHandle.cancel":
        handle.cancel()
    else:
        subprocess.run(["scancel", handle.job_id], check=True)
    with pytest.raises(JobCancelledError, match=f"^job {handle.job_id} was cancelled$"):
        handle.result(timeout=600)
    MEASURED[f"slurm_{how}_to_error_s"] = time.monotonic() - started
    wait_until(lambda: not live_pids(run_dir), 60, "every task process to exit")
    MEASURED[f"slurm_{how}_to_no_process_s"] = time.monotonic() - started
    wait_until(lambda: handle.state == "CANCELLED", 60, "Slurm to record the cancellation")
    assert handle.state == "CANCELLED" and handle.done()


def test_failing_job_surfaces_remote_traceback(slurm_cluster, tmp_path):
    handle = submit(toy_cfg(tasks_per_node=2), tmp_path / "run", target=TOY, target_kwargs={"steps": 50, "fail_at_step": 3, "fail_rank": 1})
    started = time.monotonic()
    with pytest.raises(JobFailedError) as info:
        handle.result(timeout=600)
    MEASURED["slurm_failure_to_error_s"] = time.monotonic() - started
    assert "ValueError: toy failure at step 3 on rank 1" in str(info.value)
    assert str(info.value).splitlines()[0] == f"job {handle.job_id} failed (task 1): ValueError: toy failure at step 3 on rank 1"
    assert "Traceback" in info.value.remote_traceback and "toy.py" in info.value.remote_traceback
    assert handle.state == "FAILED"


@pytest.mark.parametrize("lost", ["answer", "request"])
def test_a_transient_sbatch_failure_is_tried_again_and_never_makes_a_second_job(slurm_cluster, tmp_path, monkeypatch, lost):
    """sbatch exits 1 without a message once (slurmctld swamped): "answer" lost after the job was
    created (the existing job is taken, not a second one), or the "request" lost (submitted again)."""
    import shutil

    submit_module = sys.modules["ltssl.launch.submit"]  # (ltssl.launch.submit is also the function's name)
    real = shutil.which("sbatch")
    bin_dir, once = tmp_path / "bin", tmp_path / "failed-once"
    bin_dir.mkdir()
    create = f'"{real}" "$@" > /dev/null; ' if lost == "answer" else ""
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\nif [ ! -e "{once}" ]; then touch "{once}"; {create}exit 1; fi\nexec "{real}" "$@"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(submit_module, "SUBMIT_RETRY_WAITS_S", (1.0, 1.0))
    handle = submit(toy_cfg(), tmp_path / "run", target=TOY, target_kwargs={"steps": 3})
    assert once.exists()
    assert handle.result(timeout=600)["value"] == toy.expected_value(3)

    def submitted_from_run_dir() -> list[str]:  # every job whose sbatch script lies in this run's folder
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,SubmitLine", "-S", "now-1hour"],
                             capture_output=True, text=True).stdout
        return [line.split("|")[0] for line in out.splitlines() if str(tmp_path / "run" / "submitit") in line]

    ids = wait_until(lambda: handle.job_id in submitted_from_run_dir() and submitted_from_run_dir(), 120,
                     "accounting to record the job")
    assert ids == [handle.job_id]
    assert json.loads((tmp_path / "run" / "job.json").read_text())["job_id"] == handle.job_id


def test_preflight_refuses_before_submission(slurm_cluster, tmp_path):
    before = squeue_ids()
    run_dir = tmp_path / "run"
    cases = [
        (toy_cfg(partition="nope"), "launch.partition 'nope' does not exist (partitions: cpu, gpu)"),
        (toy_cfg(cpus_per_task=9), "launch: 1 tasks x 9 CPUs = 9 CPUs per node, but nodes of partition cpu have at most 8"),
        (toy_cfg(tasks_per_node=3, cpus_per_task=3), "launch: 3 tasks x 3 CPUs = 9 CPUs per node, but nodes of partition cpu have at most 8"),
        (toy_cfg(partition="gpu", gpus_per_node=1), "launch.gpus_per_node=1, but nodes of partition gpu have at most 0 GPUs"),
        (toy_cfg(mem_gb=10000), "launch.mem_gb=10000, but nodes of partition cpu have at most"),
        (toy_cfg(nodes=2), "launch.nodes=2, but only 1 node(s) of partition cpu fit"),
    ]
    for cfg, message in cases:
        with pytest.raises(LaunchError) as info:
            submit(cfg, run_dir, target=TOY)
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    assert not run_dir.exists() and squeue_ids() <= before


def test_train_cli_on_the_cluster(slurm_cluster, tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("launch:\n  timeout_min: 5\n  signal_delay_s: 30\n  mem_gb: 1\n")
    run = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config), "--target", TOY]
    out = subprocess.run(run + ["--partition", "cpu", "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(Slurm partition cpu)" in out.stdout and str(tmp_path / "run") in out.stdout
    assert f"value: {toy.expected_value(20)}" in out.stdout
    assert JobHandle.attach(tmp_path / "run").state == "COMPLETED"
    refused = subprocess.run(run + ["--partition", "nope", "--output-dir", str(tmp_path / "no")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["train.py: error: launch.partition 'nope' does not exist (partitions: cpu, gpu)"]
    assert not (tmp_path / "no").exists()


def test_time_limit_signal_checkpoints_requeues_and_resumes(time_limit_job):
    """Last in the file: the job submitted by the fixture has had the other tests' time to run."""
    handle = time_limit_job
    result = handle.result(timeout=400)
    assert result["value"] == toy.expected_value(140), "a resumed run must end where an uninterrupted one does"
    assert result["resumed_from"] > 0
    run_dir = handle.run_dir
    assert attempts(run_dir) >= 2
    assert "ltssl: preemption signal: checkpoint saved" in handle.paths(0).stdout.read_text()
    assert "this job is timed-out" in handle.paths(0).stderr.read_text()
    if MEASURED:
        print("\nmeasured:", json.dumps({k: round(v, 2) for k, v in MEASURED.items()}))
