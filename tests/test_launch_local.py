"""The launch layer through submitit's local executor: no Slurm needed, a few seconds each.

The jobs run ``ltssl.launch.toy:train``, a deterministic integer "trainer" with the real trainer's
resume/checkpoint contract, so these tests check the launch machinery alone.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ltssl.config import load_config
from ltssl.launch import JobCancelledError, JobFailedError, JobHandle, LaunchError, preflight, submit
from ltssl.launch import toy
from ltssl.launch.local import process_group_alive
from waiting import wait_until

TOY = "ltssl.launch.toy:train"
REPO = Path(__file__).resolve().parents[1]


def local_cfg(**launch):
    return load_config({"launch": {"timeout_min": 5, "signal_delay_s": 30, **launch}})


def pids_alive(run_dir: Path) -> list[int]:
    """Pids the toy trainer recorded that still exist (zombies excluded)."""
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


def metrics_lines(run_dir: Path) -> int:
    """Lines of the run's metrics.jsonl so far (0 before the file exists)."""
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_local_job_returns_result_and_records_the_run(tmp_path):
    handle = submit(local_cfg(), tmp_path / "run", target=TOY, target_kwargs={"steps": 10})
    result = handle.result(timeout=600)
    assert result["value"] == toy.expected_value(10)
    assert handle.state == "COMPLETED" and handle.done()
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "job.json").read_text())
    assert record["job_id"] == handle.job_id and record["executor"] == "local"
    assert record["partition"] is None and record["node_list"] == os.uname().nodename
    assert len(record["git_commit"]) == 40
    assert [a["restart"] for a in record["attempts"]] == [0]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "result.json").is_file()
    assert (run_dir / "submitit" / f"{handle.job_id}_0_log.out").is_file()
    # another process (a restarted driver) re-attaches through job.json; a handle pickles
    attached = JobHandle.attach(run_dir)
    assert attached.result(timeout=5) == result and attached.state == "COMPLETED"
    assert pickle.loads(pickle.dumps(handle)).result(timeout=5) == result


def test_local_ddp_two_tasks_returns_rank0_result(tmp_path):
    handle = submit(local_cfg(tasks_per_node=2), tmp_path / "run", target=TOY, target_kwargs={"steps": 6})
    result = handle.result(timeout=600)
    assert result["rank"] == 0 and result["world_size"] == 2
    assert result["value"] == toy.expected_value(6, world_size=2)


def test_local_failure_surfaces_remote_traceback(tmp_path):
    handle = submit(local_cfg(), tmp_path / "run", target=TOY, target_kwargs={"steps": 10, "fail_at_step": 3})
    with pytest.raises(JobFailedError) as info:
        handle.result(timeout=600)
    text = str(info.value)
    assert "Traceback" in text and "ValueError: toy failure at step 3 on rank 0" in text
    # the one-line summary first (what failed), then the remote traceback
    assert text.splitlines()[0] == f"job {handle.job_id} failed (task 0): ValueError: toy failure at step 3 on rank 0"
    assert "toy.py" in info.value.remote_traceback
    assert handle.state == "FAILED"


def test_local_ddp_failure_of_rank1_surfaces_its_traceback(tmp_path):
    handle = submit(local_cfg(tasks_per_node=2), tmp_path / "run", target=TOY, target_kwargs={"steps": 50, "fail_at_step": 3, "fail_rank": 1})
    with pytest.raises(JobFailedError) as info:
        handle.result(timeout=600)
    # rank 0 fails next (its peer is gone): the error shown is rank 1's, the cause
    assert info.value.summary == f"job {handle.job_id} failed (task 1): ValueError: toy failure at step 3 on rank 1"
    assert "ValueError: toy failure at step 3 on rank 1" in info.value.remote_traceback


def test_local_time_limit_checkpoints_requeues_and_matches_uninterrupted(tmp_path):
    # timeout 1 min, signal 50 s before: the local controller sends USR2 10 s into each attempt of
    # this ~12 s run; rank 0 checkpoints, exits with submitit's requeue code and is restarted
    cfg = local_cfg(timeout_min=1, signal_delay_s=50)
    kwargs = {"steps": 120, "step_s": 0.1, "checkpoint_every": 10**6}
    handle = submit(cfg, tmp_path / "run", target=TOY, target_kwargs=kwargs)
    result = handle.result(timeout=300)
    assert result["value"] == toy.expected_value(120)
    assert result["resumed_from"] > 0, "the requeued attempt must resume from the signal-time checkpoint"
    saved_at = [int(x) for x in (tmp_path / "run" / "checkpoint_now.log").read_text().split()]
    assert result["resumed_from"] == saved_at[-1]
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    assert [a["restart"] for a in record["attempts"]][:2] == [0, 1]


def test_local_ddp_preemption_signal_requeues_both_tasks_and_matches(tmp_path):
    """USR2 to both tasks (what the controller sends at the time limit) once training runs: rank 0
    checkpoints and asks for a requeue, the controller ends rank 1 and restarts both."""
    run_dir = tmp_path / "run"
    handle = submit(local_cfg(tasks_per_node=2), run_dir, target=TOY, target_kwargs={"steps": 200, "step_s": 0.05, "checkpoint_every": 10**6})
    wait_until(lambda: metrics_lines(run_dir) >= 20, 120, "20 lines of metrics.jsonl", poll=0.05)
    for pid in pids_alive(run_dir):
        os.kill(pid, signal.SIGUSR2)
    result = handle.result(timeout=300)
    assert result["value"] == toy.expected_value(200, world_size=2)
    assert result["resumed_from"] >= 20
    record = json.loads((run_dir / "job.json").read_text())
    assert [a["restart"] for a in record["attempts"]] == [0, 1]


def test_local_cancel_ends_the_job_and_leaves_no_process(tmp_path):
    run_dir = tmp_path / "run"
    handle = submit(local_cfg(), run_dir, target=TOY, target_kwargs={"steps": 100000, "step_s": 0.05})
    wait_until(lambda: metrics_lines(run_dir) >= 2, 60, "2 lines of metrics.jsonl", poll=0.05)
    handle.cancel()
    assert handle.state == "CANCELLED"
    with pytest.raises(JobCancelledError, match=f"job {handle.job_id} was cancelled"):
        handle.result(timeout=600)
    assert not process_group_alive(int(handle.job_id)) and pids_alive(run_dir) == []
    # rank 0 saved a checkpoint on the way out (SIGTERM)
    assert (run_dir / "checkpoints" / "last.json").is_file()
    # another handle on the same run sees the cancellation too
    assert JobHandle.attach(run_dir).state == "CANCELLED"


def test_local_cancel_from_a_process_that_blocks_sigint(tmp_path):
    """Ray workers block SIGINT (inherited by children): cancel must still end the job."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import json, signal, sys, time
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT, signal.SIGTERM}})
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from ltssl.config import load_config
        from ltssl.launch import submit, JobCancelledError
        cfg = load_config({{"launch": {{"timeout_min": 5, "signal_delay_s": 30, "tasks_per_node": 2}}}})
        h = submit(cfg, {str(run_dir)!r}, target={TOY!r}, target_kwargs={{"steps": 100000, "step_s": 0.05}})
        path = {str(run_dir / "metrics.jsonl")!r}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(open(path).read().splitlines()) >= 2:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        h.cancel()
        try:
            h.result(timeout=600)
        except JobCancelledError as e:
            print(json.dumps({{"error": str(e), "job_id": h.job_id}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "was cancelled" in report["error"]
    assert not process_group_alive(int(report["job_id"])) and pids_alive(run_dir) == []


def test_preflight_refuses_before_submitting(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(LaunchError, match=r"^launch.nodes must be 1 without launch.partition"):
        submit(local_cfg(nodes=2), run_dir, target=TOY)
    missing = tmp_path / "no-cifar"
    cfg = load_config({"data": {"dataset": "cifar10", "root": str(missing)}, "launch": {"timeout_min": 5, "signal_delay_s": 30}})
    with pytest.raises(LaunchError) as info:
        submit(cfg, run_dir, target=TOY)
    assert str(info.value).startswith(f"data.root {missing} does not exist: get cifar-10-python.tar.gz")  # and how to get it
    assert "\n" not in str(info.value)
    with pytest.raises(LaunchError, match="launch.signal_delay_s must be < launch.timeout_min"):
        preflight(local_cfg(timeout_min=1, signal_delay_s=60))
    assert not run_dir.exists(), "a refused job must not create its run folder"


def test_train_cli_bad_config_exits_2_without_submitting(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  rho: -1\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config), "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["train.py: error: optim.rho must be >= 0, got -1"]
    assert not (tmp_path / "run").exists()


def test_train_cli_runs_locally(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("train:\n  seed: 3\nlaunch:\n  timeout_min: 5\n  signal_delay_s: 30\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config), "train.seed=4",
         "--output-dir", str(tmp_path / "run"), "--target", TOY, "launch.timeout_min=6"],  # overrides around the flags
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "run") in out.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["value"] == toy.expected_value(20, seed=4)
    assert "timeout_min: 6" in (tmp_path / "run" / "config.yaml").read_text()


def test_partitions_example_is_valid_launch_sections():
    """slurm/partitions.example.yaml documents launch: sections: each must load as one."""
    import yaml

    example = yaml.safe_load((REPO / "slurm" / "partitions.example.yaml").read_text())
    assert set(example["partitions"]) == {"cpu", "gpu", "gpu_preemptible"}
    for name, launch in example["partitions"].items():
        cfg = load_config({"launch": launch})
        assert cfg.launch.partition == launch["partition"], name


def test_gpu_job_gets_one_task_per_gpu_and_every_slurm_option():
    """The sbatch script submitit would submit for a 2-node x 4-GPU job (no cluster needed)."""
    from ltssl.launch import make_executor

    cfg = load_config(
        {
            "launch": {
                "partition": "gpu", "nodes": 2, "gpus_per_node": 4, "tasks_per_node": 1, "cpus_per_task": 8,
                "mem_gb": 128, "timeout_min": 240, "signal_delay_s": 300, "account": "proj", "qos": "scavenger",
                "constraint": "a100", "requeue_on_node_failure": True,
            }
        }
    )
    executor = make_executor(cfg, "/tmp/ltssl-sbatch-text/submitit")
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for flag in (
        "--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
        "--mem=128GB", "--time=240", "--signal=USR2@300", "--account=proj", "--qos=scavenger",
        "--constraint=a100", "--requeue",
    ):
        assert f"#SBATCH {flag}\n" in text, flag
    assert "srun --unbuffered" in text and "--kill-on-bad-exit=1" in text
    assert executor._executor.max_num_timeout == cfg.launch.max_num_timeout


@pytest.mark.slow
def test_local_cancel_from_inside_a_ray_worker(tmp_path):
    """The real thing: a Ray task (SIGINT blocked in its worker) submits, then cancels."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    script = textwrap.dedent(
        f"""
        import json, os, signal, time
        os.environ["RAY_TMPDIR"] = {ray_tmp!r}
        import ray
        ray.init(num_cpus=1, logging_level="ERROR", log_to_driver=False, include_dashboard=False, _temp_dir={ray_tmp!r})

        @ray.remote
        def run(run_dir):
            from ltssl.config import load_config
            from ltssl.launch import submit, JobCancelledError
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
            cfg = load_config({{"launch": {{"timeout_min": 5, "signal_delay_s": 30, "tasks_per_node": 2}}}})
            h = submit(cfg, run_dir, target={TOY!r}, target_kwargs={{"steps": 100000, "step_s": 0.05}})
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if len(open(run_dir + "/metrics.jsonl").read().splitlines()) >= 2:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.05)
            h.cancel()
            try:
                h.result(timeout=600)
                error = None
            except JobCancelledError as e:
                error = str(e)
            return {{"sigint_blocked": signal.SIGINT in blocked, "error": error, "job_id": h.job_id}}

        print(json.dumps(ray.get(run.remote({str(tmp_path / "run")!r}))))
        ray.shutdown()
        """
    )
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sigint_blocked"], "the premise: Ray workers block SIGINT"
    assert report["error"] == f"job {report['job_id']} was cancelled"
    assert not process_group_alive(int(report["job_id"])) and pids_alive(tmp_path / "run") == []


def test_cancel_after_completion_keeps_the_result(tmp_path):
    handle = submit(local_cfg(), tmp_path / "run", target=TOY, target_kwargs={"steps": 3})
    result = handle.result(timeout=600)
    handle.cancel()  # too late: a no-op
    assert handle.state == "COMPLETED" and handle.result() == result
    assert "cancelled" not in json.loads((tmp_path / "run" / "job.json").read_text())


def test_a_job_whose_controller_was_killed_runs_on_and_a_reattached_handle_waits_for_it(tmp_path):
    """A process that started the job's controller may take the controller down with it (Ray kills a
    worker's child processes when the worker exits, e.g. after the sweep driver was SIGKILLed): the
    tasks keep training, so a re-attached handle must see RUNNING, then the result, never FAILED."""
    run_dir = tmp_path / "run"
    handle = submit(local_cfg(), run_dir, target=TOY, target_kwargs={"steps": 60, "step_s": 0.1})
    wait_until(lambda: metrics_lines(run_dir) >= 3, 60, "3 lines of metrics.jsonl", poll=0.05)
    os.kill(int(handle.job_id), signal.SIGKILL)  # the controller only (its pid is the job id)
    handle._process.wait(timeout=10)
    assert pids_alive(run_dir), "the premise: the task outlives its controller"
    attached = JobHandle.attach(run_dir)
    assert attached.state == "RUNNING" and not attached.done()
    assert attached.result(timeout=600)["value"] == toy.expected_value(60)
    assert attached.state == "COMPLETED" and handle.result(timeout=5)["value"] == toy.expected_value(60)


def test_every_child_process_of_the_launch_layer_gets_an_explicit_environment():
    """subprocess without ``env=`` execs the child with libc's live ``environ``; a thread that sets a
    variable meanwhile (Ray does while starting) frees it under the exec: "OSError: [Errno 14] Bad
    address: '.../python'". Every spawn in ltssl/launch and ltssl/sweep (the driver, where Ray's
    threads run) passes a copy (``local.child_env()``)."""
    spawns = []
    for path in sorted([*(REPO / "ltssl" / "launch").glob("*.py"), *(REPO / "ltssl" / "sweep").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("run", "Popen", "check_output", "check_call"):
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess":
                    spawns.append((f"{path.name}:{node.lineno}", any(k.arg == "env" for k in node.keywords)))
    assert len(spawns) >= 5, spawns
    assert [where for where, has_env in spawns if not has_env] == []


def test_local_jobs_share_the_machines_cpus_as_threads(monkeypatch):
    """A local sweep's jobs run side by side: each gets cpu_count // jobs_at_once threads (at least 1)
    through OMP_NUM_THREADS and MKL_NUM_THREADS, which the jobs inherit; a value the user set is kept."""
    from ltssl.launch.local import THREAD_VARIABLES, share_cpus_among_jobs

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    share_cpus_among_jobs(3)
    assert [os.environ[name] for name in THREAD_VARIABLES] == ["2", "2"]
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name)
    share_cpus_among_jobs(32)
    assert [os.environ[name] for name in THREAD_VARIABLES] == ["1", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form: passed on as written
    monkeypatch.delenv("MKL_NUM_THREADS")
    share_cpus_among_jobs(2)
    assert os.environ["OMP_NUM_THREADS"] == "4,2" and os.environ["MKL_NUM_THREADS"] == "4"
