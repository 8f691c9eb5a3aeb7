"""Thin, typed wrappers over Slurm's client commands (sinfo, scancel); job states: slurm_state.

Every call inherits ``SLURM_CONF`` from the environment (``eval "$(slurm/local-cluster env)"`` for
the local cluster) and has a timeout, so a dead controller is an error, not a hang.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ltssl.launch.errors import LaunchError
from ltssl.launch.local import child_env

COMMAND_TIMEOUT_S = 30

# Slurm job states after which the job will not run again (sacct/squeue long names).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)


def _run(args: list[str], what: str) -> str:
    if shutil.which(args[0]) is None:
        raise LaunchError(f"{args[0]} not found: Slurm's client commands are not installed here ({what})")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=child_env())
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{' '.join(args)} did not answer in {COMMAND_TIMEOUT_S} s ({what}): is slurmctld up?") from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"{' '.join(args)} failed ({what}): {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout


@dataclass(frozen=True)
class NodeInfo:
    """One node of a partition as sinfo reports it."""

    name: str
    partition: str
    cpus: int
    memory_mb: int
    gpus: int
    features: frozenset[str]
    state: str
    time_limit_min: int | None  # the partition's MaxTime; None = unlimited


def _parse_gpus(gres: str) -> int:
    """``gpu:4``, ``gpu:a100:8(S:0-1)``, ``gpu:2,shard:8`` -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_time_limit(text: str) -> int | None:
    """sinfo's ``%l``: ``infinite``, ``30:00``, ``1:00:00``, ``2-00:00:00`` -> minutes (None = no limit)."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return days * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)


def partitions() -> list[str]:
    """Names of the partitions slurmctld knows."""
    out = _run(["sinfo", "-h", "-o", "%R"], "listing partitions")
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def partition_nodes(partition: str) -> list[NodeInfo]:
    """The nodes of ``partition`` (empty when it does not exist)."""
    out = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%R|%c|%m|%G|%f|%T|%l"], f"reading partition {partition}")
    nodes = []
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 8 or fields[1] != partition:
            continue
        name, part, cpus, memory, gres, features, state, limit = fields
        nodes.append(
            NodeInfo(
                name=name,
                partition=part,
                cpus=int(re.sub(r"\D", "", cpus) or 0),
                memory_mb=int(re.sub(r"\D", "", memory) or 0),
                gpus=_parse_gpus(gres),
                features=frozenset(f for f in features.split(",") if f and f != "(null)"),
                state=state.rstrip("*~#!%$@^-"),
                time_limit_min=parse_time_limit(limit),
            )
        )
    return nodes


def normalise_state(state: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``""`` -> ``UNKNOWN``."""
    state = state.strip().split(" ")[0].rstrip("+").upper()
    return state or "UNKNOWN"


def jobs_submitted_from(folder: str | os.PathLike) -> list[str]:
    """Ids of this user's jobs in slurmctld's queue whose batch script lies under ``folder``.

    submitit writes each submission's script into the run folder, so this finds a job that sbatch
    created although it reported a failure (its answer lost on the way back).
    """
    out = _run(["squeue", "--me", "-h", "--states=all", "-o", "%i|%o"], "looking for a job of an unanswered sbatch")
    prefix = str(Path(folder).absolute()) + os.sep
    return [job_id for job_id, _, command in (line.strip().partition("|") for line in out.splitlines())
            if command.startswith(prefix)]


def cancel(job_id: str) -> None:
    """scancel the job (all its steps and tasks). Raises LaunchError when scancel fails."""
    _run(["scancel", job_id], f"cancelling job {job_id}")
