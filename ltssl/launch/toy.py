"""A tiny deterministic stand-in trainer for the launch layer's own tests and smoke checks.

It honours the trainer's contract where the launch layer depends on it: ``train(cfg, run_dir)``
resumes from ``run_dir/checkpoints/last.json``, writes metrics.jsonl and result.json (atomically),
blocks SIGTERM and the preemption signal during a step (handlers run at step boundaries), and
``checkpoint_now()`` saves the running state. Its "model" is an integer recurrence, so a resumed run
must end on exactly the same value as an uninterrupted one. With several tasks it all-reduces over
gloo, so it also proves the DDP environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) is right.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from ltssl.config import Config
from ltssl.io import atomic_write_text

_MODULUS = 2_147_483_647
_RUNNING: dict[str, Any] | None = None  # {"run_dir": Path, "step": int, "value": int} while training


def _save(state: dict[str, Any]) -> None:
    ckpt = Path(state["run_dir"]) / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt / "last.json", json.dumps({"step": state["step"], "value": state["value"]}))


def checkpoint_now() -> bool:
    """Save the running toy trainer's state now; False when none runs (or on ranks other than 0)."""
    if _RUNNING is None or int(os.environ.get("RANK", "0")) != 0:
        return False
    _save(_RUNNING)
    with open(Path(_RUNNING["run_dir"]) / "checkpoint_now.log", "a") as fh:
        fh.write(f"{_RUNNING['step']}\n")
    return True


def _join_group(world_size: int) -> Any:
    """torch.distributed with a gloo group when the job has several tasks, else None."""
    if world_size <= 1:
        return None
    # Deferred: importing torch takes seconds, and one-task toy jobs (most launch tests) never need it.
    import torch.distributed as dist  # noqa: PLC0415

    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    return dist


def _increment(step: int, rank: int, group: Any) -> int:
    """The step's increment: step + 1, plus the sum of (rank + 1) over the ranks under DDP."""
    if group is None:
        return step + 1
    import torch  # noqa: PLC0415 - deferred with torch.distributed above

    tensor = torch.tensor([rank + 1], dtype=torch.int64)
    group.all_reduce(tensor)
    return step + 1 + int(tensor.item())


def _resume_point(run_dir: Path, seed: int) -> tuple[int, int]:
    """(first step, value) from run_dir/checkpoints/last.json, or the start."""
    ckpt = run_dir / "checkpoints" / "last.json"
    if ckpt.exists():
        saved = json.loads(ckpt.read_text())
        return saved["step"], saved["value"]
    return 0, seed + 1


def train(
    cfg: Config,
    run_dir: str | os.PathLike,
    steps: int = 20,
    step_s: float = 0.05,
    checkpoint_every: int = 5,
    fail_at_step: int | None = None,
    fail_rank: int = 0,
    alloc_mb: int = 0,
) -> dict[str, Any]:
    """Run ``steps`` steps of ``step_s`` seconds each; return the final value and bookkeeping.

    ``fail_at_step``: raise ``ValueError`` at that step on rank ``fail_rank`` (to test tracebacks).
    ``alloc_mb``: hold that many MiB of touched memory for the whole run (to exceed ``--mem``).
    """
    global _RUNNING
    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "pids" / f"rank{rank}.{os.getpid()}", str(os.getpid()))
    ballast = bytearray(os.urandom(1 << 20)) * alloc_mb  # random bytes: pages that stay resident
    group = _join_group(world_size)
    start, value = _resume_point(run_dir, cfg.train.seed)
    _RUNNING = {"run_dir": run_dir, "step": start, "value": value}
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    try:
        for step in range(start, steps):
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
            try:
                if fail_at_step is not None and step == fail_at_step and rank == fail_rank:
                    raise ValueError(f"toy failure at step {step} on rank {rank}")
                time.sleep(step_s)
                value = (value * 48271 + _increment(step, rank, group)) % _MODULUS
                _RUNNING.update(step=step + 1, value=value)
                if metrics is not None:
                    metrics.write(json.dumps({"epoch": 1, "step": step + 1, "time": time.time(), "loss": value / _MODULUS}) + "\n")
                    metrics.flush()
                if rank == 0 and (step + 1) % checkpoint_every == 0:
                    _save(_RUNNING)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        result = {"value": value, "steps": steps, "world_size": world_size, "resumed_from": start, "rank": rank}
        if rank == 0:
            atomic_write_text(run_dir / "result.json", json.dumps(result))
            metrics.write(json.dumps({"epoch": 1, "step": steps, "time": time.time(), "final": True, **result}) + "\n")
        return result
    finally:
        _RUNNING = None
        del ballast
        if metrics is not None:
            metrics.close()
        if group is not None and group.is_initialized():
            group.destroy_process_group()


def expected_value(steps: int, seed: int = 0, world_size: int = 1) -> int:
    """The value an uninterrupted :func:`train` run returns."""
    value = seed + 1
    for step in range(steps):
        increment = step + 1 + (world_size * (world_size + 1) // 2 if world_size > 1 else 0)
        value = (value * 48271 + increment) % _MODULUS
    return value
