"""A stand-in trainer for the sweep tests (never used by the product), and its own checks.

``train(cfg, run_dir, epoch_s=...)`` keeps the trainer's contract where the sweep depends on it:
one metrics.jsonl line per step and per evaluation (``epoch``, ``step``, ``time``, ``loss``,
``knn_acc``), a final line with ``"final": true`` and the result keys, ``result.json`` written
atomically, and resumption from ``run_dir/checkpoints/last.json`` (the epoch reached), so a
resubmitted job continues instead of starting over. Its accuracy is a deterministic function of
the config (rho and imbalance ratio), so scheduler decisions in the tests are predictable.

With ``$STANDIN_HOLD`` set to a path, a job that has trained all its epochs waits for that file
before it writes its result: a test keeps jobs running for exactly as long as it needs them.

Failures on purpose: ``optim.rho == FAIL_RHO`` raises in its first epoch, after the step lines
and before the evaluation (a failed job, before any scheduler decision).
The jobs import this file as the module ``test_sweep_standin`` (the tests put tests/ on PYTHONPATH).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

from ltssl.config import load_config
from ltssl.io import atomic_write_text

FAIL_RHO = 0.0123
TARGET = "test_sweep_standin:train"


def accuracy(cfg, epoch: int) -> float:
    """kNN accuracy of the stand-in: higher for rho near 1, lower for larger imbalance ratios."""
    base = 0.9 - 0.15 * abs(math.log10(max(cfg.optim.rho, 1e-6))) - 0.05 * math.log10(cfg.data.imbalance_ratio)
    return round(max(0.05, base) * (1 - 0.5 ** epoch), 6)


def train(cfg, run_dir, epoch_s: float | None = None, steps_per_epoch: int = 2, pid_log: bool = True) -> dict:
    """``epoch_s`` defaults to $STANDIN_EPOCH_S (jobs started through the CLI inherit it), else 0.3."""
    if epoch_s is None:
        epoch_s = float(os.environ.get("STANDIN_EPOCH_S", "0.3"))
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / "last.json"
    start = json.loads(ckpt.read_text())["epoch"] if ckpt.exists() else 0
    if pid_log:
        with open(run_dir / "starts.log", "a") as fh:
            fh.write(f"{os.getpid()} {start}\n")
    started = time.time()
    with open(run_dir / "metrics.jsonl", "a") as out:
        for epoch in range(start + 1, cfg.train.epochs + 1):
            for s in range(steps_per_epoch):
                # like the trainer: SIGTERM/SIGUSR2 wait for the end of the step
                previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
                try:
                    time.sleep(epoch_s / steps_per_epoch)
                    step = (epoch - 1) * steps_per_epoch + s + 1
                    out.write(json.dumps({"epoch": epoch, "step": step, "time": time.time(), "loss": 1.0 / step, "lr": 0.06}) + "\n")
                    out.flush()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            if cfg.optim.rho == FAIL_RHO:
                raise ValueError(f"stand-in failure at epoch {epoch} (rho {cfg.optim.rho})")
            out.write(json.dumps({"epoch": epoch, "step": epoch * steps_per_epoch, "time": time.time(),
                                  "knn_acc": accuracy(cfg, epoch)}) + "\n")
            out.flush()
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ckpt, json.dumps({"epoch": epoch}))
        hold = os.environ.get("STANDIN_HOLD")
        while hold and not Path(hold).exists():  # the test decides when the job may finish
            time.sleep(0.2)
        n_classes = 10
        counts = [int(100 * cfg.data.imbalance_ratio ** (-c / (n_classes - 1))) for c in range(n_classes)]
        final_acc = accuracy(cfg, cfg.train.epochs)
        per_class = [round(final_acc * (0.7 + 0.3 * math.log(n) / math.log(100)), 6) for n in counts]
        result = {
            "knn_acc": final_acc,
            "linear_acc": round(final_acc + 0.02, 6),
            "acc_many": per_class[0], "acc_medium": per_class[4], "acc_few": per_class[-1],
            "per_class_acc": per_class,
            "ood_linear_acc": round(final_acc * 0.8, 6) if cfg.data.ood_dataset else None,
            "epochs_run": cfg.train.epochs,
            "train_time_s": time.time() - started,
            "n_train": sum(counts),
            "num_classes": n_classes,
            "class_counts": counts,
            "world_size": 1,
            "final_loss": 0.1,
        }
        atomic_write_text(run_dir / "result.json", json.dumps(result))
        out.write(json.dumps({"epoch": cfg.train.epochs, "step": cfg.train.epochs * steps_per_epoch,
                              "time": time.time(), "final": True, **result}) + "\n")
    return result


def test_standin_resumes_from_its_checkpoint(tmp_path):
    cfg = load_config({"train": {"epochs": 3}, "optim": {"rho": 1.0}})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.json").write_text(json.dumps({"epoch": 2}))
    result = train(cfg, tmp_path, epoch_s=0.01)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {x["epoch"] for x in lines} == {3}  # epochs 1-2 were not trained again
    assert lines[-1]["final"] is True and result["epochs_run"] == 3
    assert json.loads((tmp_path / "result.json").read_text())["knn_acc"] == accuracy(cfg, 3)


# ------------------------------------------------------------------ helpers shared by the sweep tests

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def sweep_env(tmp_path: Path, epoch_s: float) -> dict:
    """Environment of a driver subprocess: the stand-in importable, its own short Ray temp dir."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{TESTS}:{env.get('PYTHONPATH', '')}"
    env["STANDIN_EPOCH_S"] = str(epoch_s)
    env["RAY_TMPDIR"] = f"/tmp/ltr-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**6}"
    return env


def start_driver(args: list[str], env: dict, log: Path):
    """``launch/sweep.py ARGS`` in the background, stdout+stderr to ``log``."""
    import subprocess
    import sys

    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, str(REPO / "launch" / "sweep.py"), *args, "--target", TARGET],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=env.get("PWD_FOR_TEST") or None)


def ray_orphans(ray_tmpdir: str) -> list[int]:
    """Pids of Ray processes left by a killed driver (found by their temp dir in the command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ray_tmpdir in cmdline:
            pids.append(int(entry))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def end_ray_orphans(ray_tmpdir: str, timeout: float = 60) -> None:
    """SIGKILL the Ray processes a killed driver left behind until none is left (one may still be
    starting when the driver dies, so a single sweep over /proc can miss it)."""
    from waiting import wait_until

    def none_left() -> bool:
        pids = ray_orphans(ray_tmpdir)
        kill_pids(pids)
        return not pids

    wait_until(none_left, timeout, f"the Ray processes under {ray_tmpdir} to exit")


def ledger_records(output_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((output_dir / "ledger").glob("t*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return out


def checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of the stand-in's last checkpoint in ``run_dir`` (0 without one)."""
    try:
        return int(json.loads((run_dir / "checkpoints" / "last.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0
