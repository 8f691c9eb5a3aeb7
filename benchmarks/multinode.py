"""Two-node local Slurm cluster: bring-up and teardown, node failure to requeue, resumed vs uninterrupted job.

One command (root; the Slurm/munge/MariaDB packages of `make install`):

    .venv/bin/python benchmarks/multinode.py            # writes benchmarks/results/multinode.json

It runs on a cluster of its own (state folder ``$LTSSL_BENCH_CLUSTER_DIR``, default
``/tmp/ltssl-bench-2n``: its own ports, bridge address slot and namespaces), so it never touches the
cluster the tests or anyone else use, and tears it down at the end.

Measured:

* ``slurm/local-cluster up --nodes 2`` from nothing (per-phase times from its output), ``up`` when
  already up, ``down``; after every ``down`` no namespace, veth or bridge of the cluster is left.
* A 2-node DDP training job (digits-LT SimSiam + rwSAM/KDE, 1 task per node, gloo) run
  uninterrupted, then the same job with node n2 crashing mid-training (every process of its
  namespace SIGKILLed, then ``scontrol update state=down``: the operator's fast path): time from the
  kill to the job leaving RUNNING (requeued), to its next attempt running, and its end-to-end time
  against the uninterrupted run; the resumed run's weights are compared with the uninterrupted ones.
* Node-failure detection without the operator (``--natural``, on by default): only the kill; Slurm
  notices through ``SlurmdTimeout`` and requeues (a toy job, so the wait costs no training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ltssl.config import load_config  # noqa: E402
from ltssl.data import prepare_dataset  # noqa: E402
from ltssl.io import atomic_write_text  # noqa: E402
from ltssl.launch import submit  # noqa: E402

LOCAL_CLUSTER = REPO / "slurm" / "local-cluster"
NETNS = REPO / "slurm" / "lib" / "netns.sh"
BASE_CONFIG = REPO / "sweeps" / "digits_lt" / "train.yaml"


def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def timed(*args: str) -> tuple[float, str]:
    start = time.monotonic()
    out = run(*args).stdout
    return time.monotonic() - start, out


def leftovers() -> list[str]:
    return [line for line in run(NETNS, "leftovers").stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> tuple[str, int]:
    """(state, restart count) from scontrol."""
    out = run("scontrol", "show", "job", job_id, check=False).stdout
    state = re.search(r"JobState=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE"), (int(restarts.group(1)) if restarts else 0)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def nodes_idle() -> bool:
    states = run("sinfo", "-h", "-N", "-p", "cpu", "-o", "%T").stdout.split()
    return bool(states) and all(s == "idle" for s in states)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- measurements


def bring_up_and_teardown(repeats: int) -> dict:
    ups, downs, noops, phases = [], [], [], []
    for _ in range(repeats):
        run(LOCAL_CLUSTER, "down")
        seconds, out = timed(LOCAL_CLUSTER, "up", "--nodes", "2")
        ups.append(round(seconds, 3))
        phases.append({m.group(1): float(m.group(2)) for m in re.finditer(r"local-cluster: (\S+) up \(([\d.]+) s\)", out)})
        seconds, _ = timed(LOCAL_CLUSTER, "up", "--nodes", "2")
        noops.append(round(seconds, 3))
        seconds, _ = timed(LOCAL_CLUSTER, "down")
        downs.append(round(seconds, 3))
        left = leftovers()
        if left:
            raise RuntimeError(f"down left namespaces or links behind: {left}")
    return {"up_from_nothing_s": ups, "up_phases_s": phases, "up_when_already_up_s": noops, "down_s": downs,
            "left_after_down": []}


def training_cfg(cache_dir: Path, epochs: int):
    return load_config(BASE_CONFIG, overrides={
        "model.norm": "group", "data.cache_dir": str(cache_dir), "data.num_workers": 1,
        "train.epochs": epochs, "train.eval_every": 0, "train.log_every": 1, "eval.linear_epochs": 0,
        "launch.partition": "cpu", "launch.nodes": 2, "launch.tasks_per_node": 1, "launch.cpus_per_task": 1,
        "launch.mem_gb": 2, "launch.timeout_min": 30, "launch.signal_delay_s": 30,
    })


def epoch_in_training(run_dir: Path) -> int:
    """The 1-based epoch of the newest step line in metrics.jsonl (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            return int(row["epoch"])
    return 0


def max_weight_difference(run_a: Path, run_b: Path) -> float:
    a = torch.load(run_a / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(run_b / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def resumed_vs_uninterrupted(work: Path, epochs: int, crash_in_epoch: int) -> dict:
    cache = work / "data"
    prepare_dataset(training_cfg(cache, epochs).data)
    out: dict = {"epochs": epochs, "crash_in_epoch": crash_in_epoch}

    uninterrupted_dir = work / "uninterrupted"
    start = time.monotonic()
    handle = submit(training_cfg(cache, epochs), uninterrupted_dir)
    result = handle.result(timeout=1800)
    out["uninterrupted_end_to_end_s"] = round(time.monotonic() - start, 2)
    out["uninterrupted_train_time_s"] = round(result["train_time_s"], 2)

    crashed_dir = work / "crashed"
    start = time.monotonic()
    handle = submit(training_cfg(cache, epochs), crashed_dir)
    wait_for(lambda: epoch_in_training(crashed_dir) >= crash_in_epoch, 1800, f"epoch {crash_in_epoch} to train", poll_s=0.05)
    killed = time.monotonic()
    run(NETNS, "crash", "n2")
    run("scontrol", "update", "nodename=n2", "state=down", "reason=benchmark: node crash")
    marked = time.monotonic()
    wait_for(lambda: job_state(handle.job_id)[0] != "RUNNING", 120, "the job to leave RUNNING", poll_s=0.02)
    left_running = time.monotonic()
    wait_for(lambda: job_state(handle.job_id)[1] >= 1, 120, "the requeue (Restarts=1)", poll_s=0.02)
    requeued = time.monotonic()
    run(NETNS, "start", "n2")
    wait_for(lambda: job_state(handle.job_id)[0] == "RUNNING", 300, "the next attempt to run", poll_s=0.05)
    running_again = time.monotonic()
    resumed_line = wait_for(lambda: next((json.loads(l) for l in (crashed_dir / "metrics.jsonl").read_text().splitlines()
                                          if '"resumed"' in l), None), 600, "the resumed attempt to load its checkpoint")
    resumed_at = time.monotonic()
    result = handle.result(timeout=1800)
    end = time.monotonic()
    out.update(
        kill_to_marked_down_s=round(marked - killed, 3),
        kill_to_job_not_running_s=round(left_running - killed, 3),
        kill_to_requeued_s=round(requeued - killed, 3),
        requeue_to_next_attempt_running_s=round(running_again - requeued, 2),
        next_attempt_running_to_resumed_s=round(resumed_at - running_again, 2),
        resumed_from={"epoch": resumed_line["epoch"], "global_step": resumed_line["step"], "step_in_epoch": resumed_line.get("step_in_epoch")},
        crashed_end_to_end_s=round(end - start, 2),
        crashed_train_time_s=round(result["train_time_s"], 2),
        overhead_vs_uninterrupted_s=round((end - start) - out["uninterrupted_end_to_end_s"], 2),
        attempts=len(json.loads((crashed_dir / "job.json").read_text())["attempts"]),
        max_weight_difference_vs_uninterrupted=max_weight_difference(crashed_dir, uninterrupted_dir),
    )
    wait_for(nodes_idle, 120, "n2 back in service")
    return out


def natural_detection(work: Path) -> dict:
    """Kill n2's processes and let Slurm find out by itself (SlurmdTimeout)."""
    cfg = load_config(overrides={"launch.partition": "cpu", "launch.nodes": 2, "launch.tasks_per_node": 1,
                                 "launch.mem_gb": 1, "launch.timeout_min": 30, "launch.signal_delay_s": 30})
    run_dir = work / "natural"
    handle = submit(cfg, run_dir, target="ltssl.launch.toy:train", target_kwargs={"steps": 100000, "step_s": 0.05})
    wait_for(lambda: job_state(handle.job_id)[0] == "RUNNING" and (run_dir / "metrics.jsonl").exists(), 300, "the toy job to run")
    timeout = re.search(r"SlurmdTimeout\s*=\s*(\d+)", run("scontrol", "show", "config").stdout)
    killed = time.monotonic()
    run(NETNS, "crash", "n2")
    wait_for(lambda: "down" in run("sinfo", "-h", "-n", "n2", "-o", "%T").stdout.lower(), 600, "n2 to be marked DOWN", poll_s=0.2)
    down = time.monotonic()
    wait_for(lambda: job_state(handle.job_id)[1] >= 1, 600, "the requeue", poll_s=0.2)
    requeued = time.monotonic()
    handle.cancel()
    run(NETNS, "start", "n2")
    wait_for(nodes_idle, 120, "n2 back in service")
    return {"slurmd_timeout_s": int(timeout.group(1)) if timeout else None,
            "kill_to_node_down_s": round(down - killed, 2), "kill_to_requeued_s": round(requeued - killed, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="bring-up/teardown cycles")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the training jobs")
    parser.add_argument("--crash-in-epoch", type=int, default=4, help="1-based epoch in which n2 crashes")
    parser.add_argument("--natural", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure detection without `scontrol update state=down` (about a minute)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multinode.json"))
    args = parser.parse_args()

    state_dir = Path(os.environ.get("LTSSL_BENCH_CLUSTER_DIR", "/tmp/ltssl-bench-2n"))
    os.environ["LTSSL_CLUSTER_DIR"] = str(state_dir)
    os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
    work = Path(os.environ.get("LTSSL_BENCH_WORK_DIR", "/tmp/ltssl-bench-2n-work"))
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)

    report: dict = {
        "benchmark": "multinode",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "load_average_at_start": load_average()},
        "cluster_dir": str(state_dir),
    }
    try:
        print("bring-up / teardown ...", flush=True)
        report["cluster"] = bring_up_and_teardown(args.repeats)
        print(json.dumps(report["cluster"]), flush=True)
        run(LOCAL_CLUSTER, "up", "--nodes", "2")
        print("uninterrupted and crashed training jobs ...", flush=True)
        report["node_crash_fast_path"] = resumed_vs_uninterrupted(work, args.epochs, args.crash_in_epoch)
        print(json.dumps(report["node_crash_fast_path"]), flush=True)
        if args.natural:
            print("node failure detected by Slurm itself ...", flush=True)
            report["node_crash_detected_by_slurm"] = natural_detection(work)
            print(json.dumps(report["node_crash_detected_by_slurm"]), flush=True)
    finally:
        run(LOCAL_CLUSTER, "down", check=False)
        report["left_after_final_down"] = leftovers()
        report["machine"]["load_average_at_end"] = load_average()
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
