"""Disk full (issue 14, fault 4) on a real small file system (a tmpfs mounted for the test): every
writer of a run or a sweep keeps the previous file intact, says which path found no space left on
device, never leaves a partial file to be read back as valid, and works again once space is freed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ltssl.checkpoint import CheckpointStore
from ltssl.config import load_config, to_dict
from ltssl.io import (
    DiskFullError,
    LineAppender,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
)
from ltssl.results import ResultsWriter, read_jsonl, read_results, write_parquet_atomic
from ltssl.sweep.ledger import Ledger
from ltssl.sweep.trial import MetricsTail
from ltssl.train import MetricsLog

FILLER = ".filler"


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 4 MiB tmpfs (needs root, as `make test` runs); unmounted afterwards whatever happens."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if done.returncode != 0:  # a file left open: detach it anyway, and fail the test that left it
            subprocess.run(["umount", "-l", str(mnt)], check=True, capture_output=True)
            pytest.fail(f"umount {mnt}: {done.stderr.strip()}")


def fill(disk: Path) -> None:
    """Take every free block of ``disk`` (a short write fills the last pages, then ENOSPC)."""
    fd = os.open(disk / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    chunk = b"\0" * (1 << 16)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0


def free(disk: Path) -> None:
    (disk / FILLER).unlink()


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted atomic write would leave."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_atomic_writers_keep_the_previous_file(disk):
    out = disk / "run"
    out.mkdir()
    table = pa.table({"a": list(range(1000))})
    state = {"epoch": torch.tensor(1), "w": torch.arange(5000, dtype=torch.float32)}
    writers = {
        "config.yaml": (lambda p: atomic_write_text(p, "x: 1\n" * 4000), lambda p: p.read_text() == "x: 1\n" * 4000),
        "result.json": (lambda p: atomic_write_json(p, {"knn_acc": [0.5] * 2000}),
                        lambda p: json.loads(p.read_text()) == {"knn_acc": [0.5] * 2000}),
        "metrics.parquet": (lambda p: atomic_write_parquet(p, table), lambda p: pq.read_table(p).equals(table)),
        "last.pt": (lambda p: atomic_torch_save(p, state),
                    lambda p: torch.equal(torch.load(p, weights_only=True)["w"], state["w"])),
    }
    for name, (write, _) in writers.items():
        write(out / name)
    before = {name: (out / name).read_bytes() for name in writers}
    fill(disk)
    for name, (write, intact) in writers.items():
        with pytest.raises(DiskFullError) as err:
            write(out / name)
        assert str(err.value) == f"{out / name}: no space left on device (the previous file is intact)"
        assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
        assert (out / name).read_bytes() == before[name] and intact(out / name)
    assert leftovers(disk) == []
    free(disk)
    atomic_write_json(out / "result.json", {"knn_acc": 0.75})
    assert json.loads((out / "result.json").read_text()) == {"knn_acc": 0.75}


def _state(epoch: int) -> dict:
    """A job state as the training job saves it (every key the store checks), ~80 kB."""
    keys = ("model", "optimizer", "schedule", "step_in_epoch", "global_step", "weights", "rng")
    return {**{key: torch.tensor(0) for key in keys}, "epoch": torch.tensor(epoch), "w": torch.full((20000,), float(epoch))}


def test_checkpoint_save_on_a_full_disk(disk):
    store = CheckpointStore(disk / "checkpoints")
    store.folder.mkdir()
    store.save(_state(3))
    fill(disk)
    with pytest.raises(DiskFullError, match=rf"^{store.path}: no space left on device \(the previous file is intact\)$"):
        store.save(_state(4))
    assert int(store.load()["epoch"]) == 3 and leftovers(disk) == []
    free(disk)
    store.save(_state(4))
    assert int(store.load()["epoch"]) == 4


def _record(run_dir: Path, trial_id: str, cfg: dict) -> dict:
    return {"trial_id": trial_id, "status": "failed", "error": f"{trial_id} failed", "config": cfg,
            "run_dir": str(run_dir / trial_id), "updated": 1.0, "group": "digits/r=10/lt/simsiam", "params": {}}


def test_ledger_and_results_on_a_full_disk_then_resume(disk):
    cfg = to_dict(load_config())
    ledger = Ledger(disk / "sweep")
    writer = ResultsWriter(disk / "sweep", "sweep-1")
    ledger.create(_record(disk / "sweep" / "trials", "t0000", cfg))
    writer.write([ledger.read("t0000")])
    fill(disk)
    with pytest.raises(DiskFullError, match=rf"^{ledger.path('t0000')}: no space left on device \(the previous file is intact\)$"):
        ledger.update("t0000", status="running", job_id="17")
    assert ledger.read("t0000")["status"] == "failed"
    with pytest.raises(DiskFullError, match=rf"^{ledger.path('t0001')}: no space left on device"):
        ledger.create(_record(disk / "sweep" / "trials", "t0001", cfg))
    assert not ledger.exists("t0001")
    second = _record(disk / "sweep" / "trials", "t0001", cfg)
    with pytest.raises(DiskFullError, match=rf"^{disk / 'sweep' / 'results.parquet'}: no space left on device"):
        writer.add(second)
    with pytest.raises(DiskFullError, match=rf"^{disk / 'sweep' / 'other.parquet'}: no space left on device"):
        write_parquet_atomic(pa.table({"a": [1]}), disk / "sweep" / "other.parquet")
    results, _, _ = read_results(disk / "sweep")
    assert results.trial_id.tolist() == ["t0000"]  # the previous parquet, whole
    assert leftovers(disk) == []
    # Space freed: the sweep's writers carry on from where they were (what --resume does).
    free(disk)
    ledger.create(second)
    ledger.update("t0000", status="failed", error="t0000 failed again")
    writer.write([ledger.read("t0000"), ledger.read("t0001")])
    results, _, _ = read_results(disk / "sweep")
    assert results.trial_id.tolist() == ["t0000", "t0001"]
    assert results.set_index("trial_id").error.to_dict() == {"t0000": "t0000 failed again", "t0001": "t0001 failed"}


def _long_line(epoch: int) -> dict:
    return {"epoch": epoch, "step": epoch * 10, "loss": 1.0 / (epoch + 1), "per_class_acc": [0.123456789] * 2000}


def test_metrics_jsonl_partial_line_is_never_read_back(disk):
    path = disk / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    log.write(epoch=0, loss=1.0)
    log.write(epoch=1, loss=0.9)
    fill(disk)
    with pytest.raises(OSError) as err:
        log.write(**_long_line(2))  # the file's last page takes a fragment, then the disk is full
    assert err.value.errno == errno.ENOSPC
    assert not path.read_bytes().endswith(b"\n")  # a fragment is on disk ...
    assert [line["epoch"] for line in read_jsonl(path)] == [0, 1]  # ... and never read back as a line
    log.close()
    free(disk)
    resumed = MetricsLog(path, enabled=True)  # a requeued job appends to the same file
    resumed.write(epoch=3, loss=0.7)
    resumed.close()
    assert [line["epoch"] for line in read_jsonl(path)] == [0, 1, 3]


def test_line_appender_full_disk_fragment_then_resume(disk):
    path = disk / "metrics.jsonl"
    tail = MetricsTail(path)
    with LineAppender(path) as out:
        out.write(json.dumps({"epoch": 0}))
        out.write(json.dumps({"epoch": 1}))
    assert [line["epoch"] for line in tail.read()] == [0, 1]
    fill(disk)
    out = LineAppender(path)
    with pytest.raises(DiskFullError) as err:
        out.write(json.dumps(_long_line(2)))
    assert str(err.value) == f"{path}: no space left on device (the line was not written whole; earlier lines are intact)"
    assert not path.read_bytes().endswith(b"\n")  # the fragment is there ...
    assert [line["epoch"] for line in read_jsonl(path)] == [0, 1]  # ... and never read back as a line
    assert tail.read() == []
    out.close()
    free(disk)
    with LineAppender(path) as resumed:  # a requeued job appends to the same file
        resumed.write(json.dumps(_long_line(2)))
        resumed.write(json.dumps({"epoch": 3}))
    assert [line["epoch"] for line in read_jsonl(path)] == [0, 1, 2, 3]
    assert [line["epoch"] for line in tail.read()] == [2, 3]
    assert read_jsonl(path)[2] == _long_line(2)
