"""results.parquet / metrics.parquet: one schema in code, rows from a trial's files, atomic rewrites."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ltssl.config import Config, load_config, to_dict
from ltssl.results import (
    METRICS_SCHEMA,
    RESULTS_SCHEMA,
    ResultsWriter,
    describe_schema,
    metrics_rows,
    read_jsonl,
    read_results,
    result_row,
    write_parquet_atomic,
)
from ltssl.sweep.ledger import Ledger

SPEC_COLUMNS = [
    "sweep_id", "trial_id", "status", "error", "dataset", "imbalance_ratio", "n_train", "method", "optimizer", "rho",
    "adaptive", "weighting", "label_power_base", "kde_alpha", "kde_bandwidth", "balanced", "seed", "epochs_run",
    "knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few", "ood_linear_acc", "per_class_acc", "class_counts",
    "train_time_s", "slurm_job_id", "partition", "nodes", "gpus", "node_list", "git_commit", "config_json", "run_dir",
]


def make_trial(output_dir: Path, trial_id: str, status: str, *, rho: float, ratio: float = 10.0, seed: int = 0,
               epochs: int = 3, knn=(0.5, 0.6, 0.7), result: bool = True, error: str | None = None,
               balanced: bool = False, method: str = "simsiam", ood: float | None = None, partition: str | None = "cpu") -> dict:
    """A ledger record and the files its job would leave (metrics.jsonl, result.json, job.json)."""
    cfg = load_config({"data": {"imbalance_ratio": ratio, "balanced": balanced}, "method": {"name": method},
                       "optim": {"rho": rho}, "train": {"epochs": epochs, "seed": seed},
                       "launch": {"partition": partition, "nodes": 1, "gpus_per_node": 2}})
    run_dir = output_dir / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch, acc in enumerate(knn, start=1):
        lines.append({"epoch": epoch, "step": epoch * 4 - 2, "time": 1000.0 + epoch, "loss": 1.0 / epoch, "lr": 0.05,
                      "images_per_s": 100.0, "weight_mean": 1.0, "weight_max": 1.5})
        lines.append({"epoch": epoch, "step": epoch * 4, "time": 1000.5 + epoch, "knn_acc": acc, "epoch_loss": 0.3})
    counts = [100, 46, 21, 10]
    res = None
    if result:
        per_class = [0.9, 0.8, 0.7, 0.6]
        res = {"knn_acc": knn[-1], "linear_acc": knn[-1] + 0.05, "acc_many": 0.9, "acc_medium": 0.75, "acc_few": 0.6,
               "per_class_acc": per_class, "ood_linear_acc": ood, "epochs_run": len(knn), "train_time_s": 12.5,
               "n_train": sum(counts), "num_classes": 4, "class_counts": counts, "world_size": 1, "final_loss": 0.2}
        lines.append({"epoch": len(knn), "step": len(knn) * 4, "time": 1010.0, "final": True, **res})
        (run_dir / "result.json").write_text(json.dumps(res))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "job.json").write_text(json.dumps({"job_id": f"9{trial_id[1:]}", "node_list": "vm", "git_commit": "abc123"}))
    ledger = Ledger(output_dir)
    record = ledger.create({"trial_id": trial_id, "params": {"optim.rho": rho, "data.imbalance_ratio": ratio, "train.seed": seed},
                            "config": to_dict(cfg), "group": f"digits/r={ratio:g}/lt/{method}", "run_dir": str(run_dir),
                            "partition": partition})
    return ledger.update(trial_id, status=status, job_id=f"9{trial_id[1:]}", error=error)


def test_schema_has_the_documented_columns_and_types():
    names = [f.name for f in RESULTS_SCHEMA]
    for col in SPEC_COLUMNS:
        assert col in names, col
    types = {f.name: f.type for f in RESULTS_SCHEMA}
    assert types["imbalance_ratio"] == pa.float64() and types["seed"] == pa.int64()
    assert types["per_class_acc"] == pa.list_(pa.float64()) and types["class_counts"] == pa.list_(pa.int64())
    assert types["balanced"] == pa.bool_() and types["slurm_job_id"] == pa.string()
    assert all(desc for _, _, desc in describe_schema())  # every column documented
    assert [f.name for f in METRICS_SCHEMA][:3] == ["sweep_id", "trial_id", "epoch"]


def test_rows_from_a_completed_a_stopped_and_a_failed_trial(tmp_path):
    done = make_trial(tmp_path, "t0000", "completed", rho=0.5)
    stopped = make_trial(tmp_path, "t0001", "stopped_early", rho=2.0, knn=(0.4, 0.45), result=False)
    failed = make_trial(tmp_path, "t0002", "failed", rho=0.01, knn=(0.3,), result=False,
                        error="job 12 failed (task 0):\nTraceback ...\nValueError: boom")
    row = result_row(done, "sw1")
    assert row["status"] == "completed" and row["rho"] == 0.5 and row["imbalance_ratio"] == 10.0
    assert row["linear_acc"] == 0.75 and row["knn_acc"] == 0.7 and row["epochs_run"] == 3
    assert row["per_class_acc"] == [0.9, 0.8, 0.7, 0.6] and row["class_counts"] == [100, 46, 21, 10]
    assert row["n_train"] == 177 and row["slurm_job_id"] == "90000" and row["node_list"] == "vm"
    assert row["git_commit"] == "abc123" and row["gpus"] == 2 and row["nodes"] == 1 and row["partition"] == "cpu"
    assert json.loads(row["config_json"])["optim"]["rho"] == 0.5 and row["run_dir"].endswith("trials/t0000")
    srow = result_row(stopped, "sw1")
    assert srow["status"] == "stopped_early" and srow["knn_acc"] == 0.45 and srow["epochs_run"] == 2
    assert srow["linear_acc"] is None and srow["per_class_acc"] is None
    frow = result_row(failed, "sw1")
    assert frow["status"] == "failed" and "ValueError: boom" in frow["error"] and frow["knn_acc"] == 0.3


def test_writer_writes_both_files_and_skips_unfinished_trials(tmp_path):
    make_trial(tmp_path, "t0000", "completed", rho=0.5)
    make_trial(tmp_path, "t0001", "stopped_early", rho=2.0, knn=(0.4, 0.45), result=False)
    make_trial(tmp_path, "t0002", "running", rho=1.0, knn=(0.55,), result=False)  # still running: no row
    writer = ResultsWriter(tmp_path, "sw1", metric="knn_acc", mode="max")
    results_path, metrics_path = writer.write(Ledger(tmp_path).all())
    table = pq.read_table(results_path)
    assert table.schema.remove_metadata() == RESULTS_SCHEMA.remove_metadata()
    assert table.schema.metadata[b"metric"] == b"knn_acc"
    df = table.to_pandas()
    assert list(df["trial_id"]) == ["t0000", "t0001"] and list(df["status"]) == ["completed", "stopped_early"]
    metrics = pd.read_parquet(metrics_path)
    # every line of every trial (the running one too: learning curves of a live sweep)
    assert len(metrics) == 7 + 4 + 2
    assert set(metrics["trial_id"]) == {"t0000", "t0001", "t0002"}
    assert metrics["epoch_loss"].dtype == "float64"   # an extra numeric field became a column
    final = metrics[metrics["final"]]
    assert list(final["trial_id"]) == ["t0000"] and float(final["linear_acc"].iloc[0]) == 0.75
    res, met, meta = read_results(tmp_path)
    assert len(res) == 2 and meta["sweep_id"] == "sw1" and meta["mode"] == "max"


def test_parquet_is_always_readable_while_rewritten(tmp_path):
    """A reader never sees a partial file while the writer rewrites it (temp file + rename)."""
    for i in range(6):
        make_trial(tmp_path, f"t{i:04d}", "completed", rho=0.1 * (i + 1))
    writer = ResultsWriter(tmp_path, "sw1")
    records = Ledger(tmp_path).all()
    writer.write(records)
    stop = threading.Event()
    errors: list[Exception] = []

    def rewrite():
        for n in range(40):
            writer.write(records[: 1 + n % 6])
        stop.set()

    thread = threading.Thread(target=rewrite)
    thread.start()
    reads = 0
    while not stop.is_set():
        try:
            # one open handle: a path read opens the file twice (see ltssl.results.read_table)
            with open(tmp_path / "results.parquet", "rb") as fh:
                df = pd.read_parquet(fh)
            assert 1 <= len(df) <= 6
            df, _, _ = read_results(tmp_path)
            assert 1 <= len(df) <= 6
            reads += 1
        except Exception as error:  # a torn file would land here
            errors.append(error)
    thread.join()
    assert not errors and reads > 0
    assert not list(tmp_path.glob(".results.parquet.*"))  # no temp files left behind


def test_partial_last_line_is_left_for_later(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "knn_acc": 0.5}\n{"epoch": 2, "knn')
    assert read_jsonl(path) == [{"epoch": 1, "knn_acc": 0.5}]


def test_steps_a_resumed_attempt_ran_again_appear_once(tmp_path):
    """Attempt 1 logged steps 1-5 and checkpointed at step 3; attempt 2 resumes at 3 and re-runs 4-6."""
    lines = [{"epoch": 1, "step": s, "loss": 1.0} for s in range(1, 6)]
    lines += [{"epoch": 1, "step": 3, "resumed": True, "step_in_epoch": 3}]
    lines += [{"epoch": 1, "step": s, "loss": 0.5} for s in range(4, 7)]
    rows = metrics_rows(lines, "sw1", "t0")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if "loss" in r] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]  # the surviving attempt's values
    assert sum(1 for r in rows if r.get("resumed")) == 1


def test_empty_results_file_keeps_the_schema(tmp_path):
    path = write_parquet_atomic(pa.Table.from_pylist([], schema=RESULTS_SCHEMA), tmp_path / "results.parquet")
    df = pd.read_parquet(path)
    assert df.empty and list(df.columns) == [f.name for f in RESULTS_SCHEMA]
    assert Config().optim.rho == 0.5  # the defaults the rows above rely on


def test_add_keeps_one_row_per_finished_trial_and_parses_each_trial_once(tmp_path, monkeypatch):
    """Trials end out of order, one is recorded twice (cancelled, then completed on resume): results.parquet
    always holds exactly the finished trials, by trial id; no earlier trial's files are read again."""
    import ltssl.results as results_module

    reads: dict[str, int] = {}
    original = results_module.read_jsonl

    def counting_read(path):
        reads[Path(path).parent.name] = reads.get(Path(path).parent.name, 0) + 1
        return original(path)

    monkeypatch.setattr(results_module, "read_jsonl", counting_read)
    writer = ResultsWriter(tmp_path, "sw1", metric="knn_acc", mode="max")
    order = ["t0003", "t0000", "t0005", "t0001", "t0004", "t0002"]
    finished = []
    for n, key in enumerate(order):
        record = make_trial(tmp_path, key, "cancelled" if key == "t0001" else "completed", rho=0.1 * (n + 1))
        results_path, _ = writer.add(record)
        finished.append(key)
        df = pd.read_parquet(results_path)
        assert list(df["trial_id"]) == sorted(finished) and len(set(df["trial_id"])) == len(df)
    resumed = Ledger(tmp_path).update("t0001", status="completed")
    df = pd.read_parquet(writer.add(resumed)[0])
    assert list(df["trial_id"]) == sorted(order) and df.set_index("trial_id").loc["t0001", "status"] == "completed"
    # each trial's metrics parsed once; t0001 again when its own record changed, no other trial's
    assert reads == {**{key: 1 for key in order}, "t0001": 2}
    assert pd.read_parquet(tmp_path / "results.parquet").equals(read_results(tmp_path)[0])
    _, metrics_path = writer.write(Ledger(tmp_path).all())
    metrics = pd.read_parquet(metrics_path)
    assert len(metrics) == 7 * len(order) and sorted(set(metrics["trial_id"])) == sorted(order)
    assert reads == {**{key: 1 for key in order}, "t0001": 2}


def test_a_sweeps_writer_rewrites_at_most_once_per_interval_and_never_sooner_than_a_hundred_rewrites(tmp_path, monkeypatch):
    """A sweep's writer (results_interval_s 2 s): a burst of ends is one rewrite, the last end reaches the
    file at the next flush once due; a rewrite that took 0.1 s (a sweep of tens of thousands of trials)
    is followed by the next one no sooner than 100 x 0.1 s, so the file's share of the driver stays under 1 %."""
    import ltssl.results as results_module

    clock = {"now": 100.0, "write_s": 0.001}
    monkeypatch.setattr(results_module.time, "monotonic", lambda: clock["now"])
    original = results_module.write_parquet_atomic
    writes: list[tuple[float, str]] = []

    def slow_write(table, path):
        writes.append((clock["now"], Path(path).name))
        clock["now"] += clock["write_s"]
        return original(table, path)

    monkeypatch.setattr(results_module, "write_parquet_atomic", slow_write)
    writer = ResultsWriter(tmp_path, "sw1", metric="knn_acc", mode="max", results_interval_s=2.0, metrics_interval_s=30.0)

    def results_writes() -> list[float]:
        return [t for t, name in writes if name == "results.parquet"]

    for n in range(3):  # a burst: the first end writes, the next two wait for the interval
        writer.add(make_trial(tmp_path, f"t{n:04d}", "completed", rho=0.1 * (n + 1)))
    assert len(results_writes()) == 1 and len(pd.read_parquet(tmp_path / "results.parquet")) == 1
    clock["now"] += 1.0
    writer.flush()
    assert len(results_writes()) == 1  # 1 s after the rewrite: not due
    clock["now"] += 1.0
    writer.flush()
    assert len(results_writes()) == 2 and len(pd.read_parquet(tmp_path / "results.parquet")) == 3
    writer.flush()
    assert len(results_writes()) == 2  # nothing changed: no rewrite

    clock["write_s"] = 0.1  # rewrites now take 0.1 s: the next is due 10 s after one, not 2 s
    assert results_module.REWRITE_RATIO == 100
    clock["now"] += 5.0
    writer.add(make_trial(tmp_path, "t0003", "completed", rho=0.4))
    first_slow = results_writes()[-1]
    writer.add(make_trial(tmp_path, "t0004", "completed", rho=0.5))
    for _ in range(9):
        clock["now"] += 1.0
        writer.flush()
    assert results_writes()[-1] == first_slow  # 9.9 s after the 0.1-s rewrite ended: not due
    clock["now"] += 1.0
    writer.flush()
    assert results_writes()[-1] > first_slow and len(pd.read_parquet(tmp_path / "results.parquet")) == 5
