"""Multi-node training on a real two-node Slurm cluster built on this machine.

The cluster is ``slurm/local-cluster up --nodes 2`` (the lead's ``two_node_cluster`` fixture): nodes
``n1`` and ``n2`` are network namespaces with their own hostnames and addresses on a private bridge,
each running its own slurmd; slurmctld, slurmdbd (accounting) and a private munged run beside them.
Every job here goes through the same code as single-node jobs (:func:`ltssl.launch.submit`).

What the tests prove:

* the cluster has the intended shape: two idle nodes, each resolving its own and its peer's name to
  bridge addresses, no route out of the namespaces;
* DDP across the nodes (2 nodes x 1 task, gloo): each rank trains on its own shard of FFCV's
  distributed order, and the final weights equal a one-process run over the same global batches
  (model.norm=group, so no BatchNorm statistics differ per rank);
* a node crash mid-training (every process of n2 killed, the node marked down): Slurm requeues the
  job, it resumes from its last checkpoint (not from epoch 0) and ends with the weights of the
  uninterrupted run; the caller's handle never returns the failed attempt's stale result;
* a rank that dies does not hang its peer: the job ends with the dead rank's error (not at the end
  of the job's time limit); with requeue on node failure switched off, a node crash fails the job;
* a sweep on the two nodes: single-node trials run on both nodes at once beside one two-node trial,
  and the results parquet records each trial's node list.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import yaml

import ltssl.data.ffcv as ffcv_module
from ltssl.config import load_config
from ltssl.data import prepare_dataset
from ltssl.launch import JobFailedError, submit
from ltssl.train import train
from waiting import wait_until

pytestmark = pytest.mark.two_nodes

REPO = Path(__file__).resolve().parents[1]
NETNS = REPO / "slurm" / "lib" / "netns.sh"
BASE_CONFIG = REPO / "sweeps" / "digits_lt" / "train.yaml"
# The jobs import this module for their target (see _job_env): it records what each rank trained on.
TARGET = f"{Path(__file__).stem}:train_recording"
EPOCHS = 3
JOB_TIMEOUT_S = 400


# ----------------------------------------------------------------------------- the job's target


def train_recording(cfg, run_dir, fail_rank: int | None = None, fail_at_step: int | None = None, step_sleep_s: float = 0.0):
    """``ltssl.train.train`` that also records, per rank, the sample indices of every batch it trained
    on (``run_dir/shards/rank<r>.jsonl``: epoch, step, index list, Slurm restart count).

    ``fail_rank``/``fail_at_step``: that rank raises RuntimeError after that global step (after
    writing ``run_dir/failed_at`` with the time). ``step_sleep_s`` slows every step down (a window
    for the node-crash test; the arithmetic is unchanged).
    """
    rank = int(os.environ.get("RANK", "0"))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    log_path = Path(run_dir) / "shards" / f"rank{rank}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    real_epoch = ffcv_module.SSLLoader.epoch

    def recording_epoch(self, epoch, start_step=0):
        with open(log_path, "a") as log:
            for step, batch in enumerate(real_epoch(self, epoch, start_step), start=start_step):
                log.write(json.dumps({"epoch": epoch, "step": step, "restart": restart, "index": batch["index"].tolist()}) + "\n")
                log.flush()
                yield batch

    ffcv_module.SSLLoader.epoch = recording_epoch

    def step_hook(info):
        if step_sleep_s:
            time.sleep(step_sleep_s)
        if rank == fail_rank and info["global_step"] == fail_at_step:
            (Path(run_dir) / "failed_at").write_text(repr(time.time()))
            raise RuntimeError(f"injected failure on rank {rank} after step {fail_at_step}")

    return train(cfg, run_dir, step_hook=step_hook)


# ----------------------------------------------------------------------------- helpers


def make_cfg(cache_dir: Path, **overrides):
    """Digits-LT SimSiam + rwSAM (KDE weights), BN-free, on 2 nodes x 1 task of partition cpu."""
    values = {
        "model.norm": "group",  # no BatchNorm: DDP's per-rank batches then give the global-batch gradient
        "data.cache_dir": str(cache_dir),
        "data.num_workers": 1,
        "train.epochs": EPOCHS,
        "train.eval_every": 0,
        "train.log_every": 1,
        "eval.linear_epochs": 0,
        "launch.partition": "cpu",
        "launch.nodes": 2,
        "launch.tasks_per_node": 1,
        "launch.cpus_per_task": 1,
        "launch.mem_gb": 2,
        "launch.timeout_min": 15,
        "launch.signal_delay_s": 30,
    }
    values.update(overrides)
    return load_config(BASE_CONFIG, overrides=values)


def netns(*args: str) -> str:
    """slurm/lib/netns.sh on the test cluster (LTSSL_CLUSTER_DIR comes from the fixture's env)."""
    proc = subprocess.run([str(NETNS), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"netns.sh {' '.join(args)} failed: {proc.stderr.strip()}"
    return proc.stdout


def slurm(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)} failed: {proc.stderr.strip()}"
    return proc.stdout


def squeue_state(job_id: str) -> str:
    return slurm("squeue", "-h", "-j", job_id, "--states=all", "-o", "%T").strip() or "GONE"


def nodes_idle() -> bool:
    states = slurm("sinfo", "-h", "-N", "-p", "cpu", "-o", "%N %T").split()
    return states[1::2] == ["idle", "idle"]


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def shard_records(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "shards" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def answering_as_rank(rank: int, world_size: int):
    """torch.distributed answers as rank ``rank`` of ``world_size`` (no process group is started), so
    one process can build the loader of any rank exactly as that rank builds it."""
    saved = (dist.is_initialized, dist.get_rank, dist.get_world_size)
    dist.is_initialized = lambda: True
    dist.get_rank = lambda group=None: rank
    dist.get_world_size = lambda group=None: world_size
    try:
        yield
    finally:
        dist.is_initialized, dist.get_rank, dist.get_world_size = saved


def global_batch_loader(real_loader_class, world_size: int):
    """An SSLLoader for one process whose step k is the concatenation of step k of every rank's own
    distributed loader (same samples, same augmentations): the global batch of a DDP run."""

    class GlobalBatchSSLLoader:
        def __init__(self, beton, *, batch_size: int, distributed: bool, **kwargs):
            assert not distributed and batch_size % world_size == 0
            self.shards = []
            for rank in range(world_size):
                with answering_as_rank(rank, world_size):
                    self.shards.append(real_loader_class(beton, batch_size=batch_size // world_size, distributed=True, **kwargs))
            self.seen: list[tuple[int, int, list[list[int]]]] = []

        def __len__(self) -> int:
            return len(self.shards[0])

        def epoch(self, epoch: int, start_step: int = 0):
            for step, parts in enumerate(zip(*(s.epoch(epoch, start_step) for s in self.shards)), start=start_step):
                self.seen.append((epoch, step, [p["index"].tolist() for p in parts]))
                yield {
                    "views": [torch.cat([p["views"][k] for p in parts]) for k in range(len(parts[0]["views"]))],
                    "label": torch.cat([p["label"] for p in parts]),
                    "index": torch.cat([p["index"] for p in parts]),
                }

    return GlobalBatchSSLLoader


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(two_node_cluster):
    """The two-node cluster, both nodes idle; jobs can import this module (PYTHONPATH)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), saved) if p)
    wait_until(nodes_idle, 60, "both nodes idle")
    yield two_node_cluster
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """The prepared digits-LT dataset, built once for every job of this module."""
    cache = tmp_path_factory.mktemp("multinode-data")
    prepare_dataset(make_cfg(cache).data)
    return cache


@pytest.fixture(scope="module")
def ddp_run(cluster, data_cache, tmp_path_factory) -> tuple[Path, dict, float]:
    """An uninterrupted 2-node DDP run: (run_dir, result, wall seconds from submit to result)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    started = time.monotonic()
    handle = submit(make_cfg(data_cache), run_dir, target=TARGET)
    result = handle.result(timeout=JOB_TIMEOUT_S)
    return run_dir, result, time.monotonic() - started


# ----------------------------------------------------------------------------- tests


def test_two_node_cluster_has_two_namespaced_nodes(cluster):
    nodes = slurm("sinfo", "-h", "-N", "-p", "cpu", "-o", "%N|%o|%T").split()
    by_name = dict((line.split("|")[0], line.split("|")[1:]) for line in nodes)
    assert sorted(by_name) == ["n1", "n2"], nodes
    addresses = {name: addr for name, (addr, _) in by_name.items()}
    assert all(addr.startswith("10.231.0.") for addr in addresses.values()) and len(set(addresses.values())) == 2
    status = subprocess.run([str(REPO / "slurm" / "local-cluster"), "status"], capture_output=True, text=True)
    assert status.returncode == 0 and "node n1" in status.stdout and "node n2" in status.stdout, status.stdout
    for name, peer in (("n1", "n2"), ("n2", "n1")):
        inside = netns("exec", name, "sh", "-c", f"hostname; getent hosts {name} {peer}; ip -4 route")
        lines = inside.splitlines()
        assert lines[0] == name
        resolved = {line.split()[1]: line.split()[0] for line in lines if len(line.split()) == 2}
        assert resolved == {name: addresses[name], peer: addresses[peer]}, inside
        assert "default" not in inside, f"{name} has a route out of the bridge:\n{inside}"


def test_ddp_across_nodes_matches_one_process_over_the_global_batch(ddp_run, data_cache, tmp_path, monkeypatch):
    run_dir, result, _ = ddp_run
    record = json.loads((run_dir / "job.json").read_text())
    assert record["node_list"] == "n[1-2]" and record["attempts"][0]["num_tasks"] == 2
    assert result["world_size"] == 2 and result["epochs_run"] == EPOCHS

    # Each rank trained on its own shard: per step, the two ranks' samples never overlap.
    ranks = [shard_records(run_dir, r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for a, b in zip(*ranks):
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        assert not set(a["index"]) & set(b["index"]), f"epoch {a['epoch']} step {a['step']}: shards overlap"
    for epoch in range(EPOCHS):
        seen = [i for r in ranks for rec in r if rec["epoch"] == epoch for i in rec["index"]]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample was used twice across ranks"

    # The same training in one process, fed each step the concatenation of both ranks' batches.
    loaders = []
    real_class = ffcv_module.SSLLoader
    wrapper = global_batch_loader(real_class, world_size=2)

    def make_loader(*args, **kwargs):
        loaders.append(wrapper(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(ffcv_module, "SSLLoader", make_loader)
    for key in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    single = train(make_cfg(data_cache), tmp_path / "one-process")
    assert single["world_size"] == 1
    assert len(loaders) == 1, "the one-process run did not build its loader through the global-batch wrapper"
    seen_one_process = [(e, s, parts) for e, s, parts in loaders[0].seen]
    seen_ddp = [(a["epoch"], a["step"], [a["index"], b["index"]]) for a, b in zip(*ranks)]
    assert seen_one_process == seen_ddp, "the one-process run did not see the DDP run's global batches"
    difference = max_weight_difference(model_weights(run_dir), model_weights(tmp_path / "one-process"))
    assert difference < 1e-5, f"2-node DDP weights differ from the one-process run by {difference:g}"


def test_node_crash_requeues_and_resumes_from_checkpoint(ddp_run, data_cache, tmp_path):
    reference_dir, reference, _ = ddp_run
    run_dir = tmp_path / "run"
    handle = submit(make_cfg(data_cache), run_dir, target=TARGET, target_kwargs={"step_sleep_s": 0.25})
    checkpoint = run_dir / "checkpoints" / "last.pt"
    wait_until(checkpoint.exists, JOB_TIMEOUT_S, "the first checkpoint", poll=0.05)
    assert not (run_dir / "result.json").exists()

    # Node n2 crashes: every process in it dies at once; the operator (or the health check) marks it down.
    netns("crash", "n2")
    try:
        slurm("scontrol", "update", "nodename=n2", "state=down", "reason=test: node crash")
        wait_until(lambda: squeue_state(handle.job_id) != "RUNNING", 120, "the job to leave RUNNING")
    finally:
        netns("start", "n2")  # the machine is back: slurmd registers and the node returns to service
    # While the job is requeued, done() stays False although rank 0 may have left an error result.
    wait_until(handle.done, JOB_TIMEOUT_S, "the requeued job to finish", poll=0.2)
    result = handle.result(timeout=600)

    record = json.loads((run_dir / "job.json").read_text())
    restarts = [attempt["restart"] for attempt in record["attempts"]]
    assert restarts[0] == 0 and restarts[-1] >= 1, record["attempts"]
    resumed = [line for line in metrics_lines(run_dir) if line.get("resumed")]
    assert resumed and resumed[0]["step"] > 0, "the requeued attempt did not resume from the checkpoint"
    first_after = min((r["epoch"], r["step"]) for r in shard_records(run_dir, 0) if r["restart"] >= 1)
    assert first_after > (0, 0), "the requeued attempt trained epoch 0 again"
    assert result["epochs_run"] == EPOCHS and result["world_size"] == 2
    difference = max_weight_difference(model_weights(run_dir), model_weights(reference_dir))
    assert difference < 1e-5, f"the resumed run's weights differ from the uninterrupted run's by {difference:g}"
    assert result["knn_acc"] == pytest.approx(reference["knn_acc"], abs=0.01)
    wait_until(nodes_idle, 60, "n2 back in service")


def test_rank_death_ends_the_job_with_the_dead_ranks_error(cluster, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(data_cache, **{"train.epochs": 2, "optim.name": "sgd"})
    handle = submit(cfg, run_dir, target=TARGET, target_kwargs={"fail_rank": 1, "fail_at_step": 2})
    with pytest.raises(JobFailedError) as failure:
        handle.result(timeout=JOB_TIMEOUT_S)  # the other rank does not hang in a collective until NCCL's timeout
    assert (run_dir / "failed_at").is_file(), "the premise: rank 1 died"
    assert "injected failure on rank 1" in str(failure.value), str(failure.value)[-2000:]
    wait_until(lambda: squeue_state(handle.job_id) in ("FAILED", "GONE"), 60, "Slurm to record the job FAILED")
    assert squeue_state(handle.job_id) in ("FAILED", "GONE")


def test_node_crash_without_requeue_fails_the_job(cluster, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(data_cache, **{"launch.requeue_on_node_failure": False, "optim.name": "sgd"})
    handle = submit(cfg, run_dir, target=TARGET, target_kwargs={"step_sleep_s": 0.25})
    wait_until(lambda: (run_dir / "shards" / "rank1.jsonl").exists(), JOB_TIMEOUT_S, "rank 1 training", poll=0.05)
    netns("crash", "n2")
    try:
        slurm("scontrol", "update", "nodename=n2", "state=down", "reason=test: node crash")
        with pytest.raises(JobFailedError):
            handle.result(timeout=600)
        wait_until(lambda: squeue_state(handle.job_id) in ("NODE_FAIL", "FAILED", "GONE"), 60, "Slurm to record the node failure")
        assert squeue_state(handle.job_id) in ("NODE_FAIL", "FAILED", "GONE")
    finally:
        netns("start", "n2")
        wait_until(nodes_idle, 60, "n2 back in service")


def test_sweep_runs_single_node_trials_on_both_nodes_beside_a_two_node_trial(cluster, data_cache, tmp_path, monkeypatch):
    """Four 1-node trials (3 of a node's 8 declared CPUs each: at most two per node, so they spread
    over n1 and n2) and one 2-node DDP trial (the 2 CPUs per node left: it runs beside them) in the
    same sweep; results.parquet records where each ran."""
    # Deferred: the jobs import this module for their target, and ltssl.sweep would import Ray there.
    from ltssl.sweep import run_sweep  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    node_cpus = int(slurm("sinfo", "-h", "-N", "-p", "cpu", "-o", "%c").split()[0])
    assert node_cpus >= 8, f"the sweep test expects nodes of >= 8 declared CPUs (LTSSL_CLUSTER_CPUS), got {node_cpus}"
    single_cpus = node_cpus // 2 - 1  # more than a third of a node: at most two such trials per node
    sweep = tmp_path / "two-node-sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "two-node",
        "base": str(BASE_CONFIG),
        "overrides": {"model.norm": "group", "optim.name": "sgd", "train.epochs": 1, "train.eval_every": 0, "eval.linear_epochs": 0,
                      "data.cache_dir": str(data_cache), "data.num_workers": 1},
        "grid": {"variants": [{"train.seed": 0}, {"train.seed": 1}, {"train.seed": 2}, {"train.seed": 3},
                              {"train.seed": 4, "launch.nodes": 2, "launch.cpus_per_task": node_cpus - 2 * single_cpus}]},
        "launch": {"cpus_per_task": single_cpus, "mem_gb": 1},
        "max_concurrent": 5,
    }, sort_keys=False))
    out = tmp_path / "out"
    run_sweep(sweep, partition="cpu", output_dir=out, dashboard=False, analyze=False)
    df = pd.read_parquet(out / "results.parquet")
    assert list(df["status"]) == ["completed"] * 5, df["error"].tolist()
    two_node = df[df["nodes"] == 2]
    single = df[df["nodes"] == 1]
    assert len(two_node) == 1 and len(single) == 4
    assert two_node["node_list"].iloc[0] == "n[1-2]"
    assert set(single["node_list"]) == {"n1", "n2"}, single["node_list"].tolist()
    # single-node trials ran at the same time on different nodes
    spans = []
    for row in single.itertuples():
        record = json.loads((Path(row.run_dir) / "job.json").read_text())
        spans.append((row.node_list, record["attempts"][0]["started"], record["finished"]))
    overlapping = [(a, b) for a in spans for b in spans if a[0] == "n1" and b[0] == "n2" and a[1] < b[2] and b[1] < a[2]]
    assert overlapping, f"no two single-node trials ran at once on n1 and n2: {spans}"
