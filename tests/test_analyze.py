"""launch/analyze.py: tables and plots from the parquet files only, on finished and running sweeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ltssl.report import analyze, best_trials, learning_curve_points
from ltssl.results import ResultsWriter
from ltssl.sweep.ledger import Ledger
from test_results import make_trial

REPO = Path(__file__).resolve().parents[1]

# knn accuracy of the synthetic trials: (ratio, rho, seed) -> final knn
KNN = {
    (1.0, 0.5, 0): 0.80, (1.0, 0.5, 1): 0.82, (1.0, 2.0, 0): 0.85, (1.0, 2.0, 1): 0.87,
    (10.0, 0.5, 0): 0.70, (10.0, 0.5, 1): 0.66, (10.0, 2.0, 0): 0.60, (10.0, 2.0, 1): 0.62,
}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep folder with completed, stopped and failed trials, and a Delta(n, r) part; its report."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    i = 0
    for (ratio, rho, seed), acc in KNN.items():
        make_trial(tmp_path, f"t{i:04d}", "completed", rho=rho, ratio=ratio, seed=seed, knn=(acc - 0.2, acc - 0.1, acc))
        i += 1
    make_trial(tmp_path, f"t{i:04d}", "stopped_early", rho=8.0, ratio=10.0, knn=(0.2, 0.25), result=False)
    i += 1
    make_trial(tmp_path, f"t{i:04d}", "failed", rho=0.01, ratio=10.0, knn=(0.1,), result=False, error="ValueError: boom")
    i += 1
    # Delta(n, r): balanced vs LT at ratio 10, SSL and supervised, 2 seeds, with OOD probes
    accs = {("simsiam", True): (0.80, 0.60), ("simsiam", False): (0.72, 0.57),
            ("supervised", True): (0.90, 0.50), ("supervised", False): (0.72, 0.40)}
    for (method, balanced), (acc, ood) in accs.items():
        for seed in (0, 1):
            make_trial(tmp_path, f"t{i:04d}", "completed", rho=0.0, ratio=10.0, seed=seed, method=method,
                       balanced=balanced, knn=(acc - 0.1, acc - 0.05 + 0.01 * seed), ood=ood + 0.01 * seed)
            i += 1
    ResultsWriter(tmp_path, "synthetic", metric="knn_acc", mode="max").write(Ledger(tmp_path).all())
    analyze(tmp_path)  # once for the module (plots take a few seconds on 2 cores)
    return tmp_path


def test_report_tables_hold_the_parquet_numbers(sweep_dir):
    folder = sweep_dir / "report"
    results = pd.read_parquet(sweep_dir / "results.parquet")
    for name in ("report.md", "status.md", "status.csv", "summary.md", "summary.csv", "best_per_ratio.md",
                 "best_per_ratio.csv", "delta.md", "delta.csv"):
        assert (folder / name).is_file(), name

    status = pd.read_csv(folder / "status.csv").set_index("status")["trials"]
    assert status["completed"] == 16 and status["stopped_early"] == 1 and status["failed"] == 1

    summary = pd.read_csv(folder / "summary.csv")
    rwsam = summary[(summary["method"] == "simsiam") & (summary["balanced"] == False) & (summary["rho"] > 0)]  # noqa: E712
    assert len(rwsam) == 4  # 2 ratios x 2 rho, seeds pooled
    row = rwsam[(rwsam["imbalance_ratio"] == 10.0) & (rwsam["rho"] == 0.5)].iloc[0]
    expected = results[(results["imbalance_ratio"] == 10.0) & (results["rho"] == 0.5) & (results["status"] == "completed")]
    assert row["seeds"] == 2
    assert row["knn_acc_mean"] == pytest.approx(expected["knn_acc"].mean())
    assert row["knn_acc_std"] == pytest.approx(expected["knn_acc"].std(ddof=1))
    assert row["acc_few_mean"] == pytest.approx(expected["acc_few"].mean())

    # best rho per ratio: 2.0 at r = 1 (0.86 on average), 0.5 at r = 10 (0.68): the ranking flips
    best = pd.read_csv(folder / "best_per_ratio.csv")
    lt = best[(best["method"] == "simsiam") & (best["balanced"] == False)].set_index("imbalance_ratio")  # noqa: E712
    assert lt.loc[1.0, "rho"] == 2.0 and lt.loc[10.0, "rho"] == 0.5
    assert lt.loc[10.0, "knn_acc (selected on)"] == f"{np.mean([0.70, 0.66]):.4f} ± {np.std([0.70, 0.66], ddof=1):.4f}"
    assert "± " in (folder / "best_per_ratio.md").read_text()


def test_delta_is_computed_per_seed_for_ssl_and_sl_in_and_out_of_domain(sweep_dir):
    folder = sweep_dir / "report"
    delta = pd.read_csv(folder / "delta.csv")
    assert set(delta["paradigm"]) == {"SSL", "SL"} and set(delta["domain"]) == {"ID", "OOD"}
    results = pd.read_parquet(sweep_dir / "results.parquet")
    for paradigm, method in (("SSL", "simsiam"), ("SL", "supervised")):
        for domain, col in (("ID", "linear_acc"), ("OOD", "ood_linear_acc")):
            got = delta[(delta["paradigm"] == paradigm) & (delta["domain"] == domain)].iloc[0]
            per_seed = []
            for seed in (0, 1):
                sel = results[(results["method"] == method) & (results["seed"] == seed) & (results["rho"] == 0.0)]
                a1 = sel[sel["balanced"]][col].iloc[0]
                ar = sel[~sel["balanced"]][col].iloc[0]
                per_seed.append((a1 - ar) / a1)
            assert got["delta"] == pytest.approx(np.mean(per_seed))
            assert got["delta_std"] == pytest.approx(np.std(per_seed, ddof=1))
            assert got["seeds"] == 2
    # supervised learning loses more to imbalance than SSL here, as built
    id_rows = delta[delta["domain"] == "ID"].set_index("paradigm")
    assert id_rows.loc["SL", "delta"] > id_rows.loc["SSL", "delta"]


def test_plots_are_written(sweep_dir):
    folder = sweep_dir / "report"
    for name in ("acc_vs_rho.png", "delta_bars.png", "per_class_acc.png", "learning_curves.png"):
        path = folder / name
        assert path.is_file() and path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (folder / "report.md").read_text()


def test_per_class_plot_shows_the_trial_best_on_the_selection_metric(sweep_dir):
    results = pd.read_parquet(sweep_dir / "results.parquet")
    picked = {(ratio, method, balanced): row for _, ratio, balanced, method, row in best_trials(results, "knn_acc", "max")}
    assert picked[(1.0, "simsiam", False)]["knn_acc"] == pytest.approx(0.87)  # rho 2, seed 1
    assert picked[(1.0, "simsiam", False)]["rho"] == 2.0
    worst = {(ratio, method, balanced): row for _, ratio, balanced, method, row in best_trials(results, "knn_acc", "min")}
    assert worst[(1.0, "simsiam", False)]["knn_acc"] == pytest.approx(0.80)


def test_learning_curves_fall_back_to_the_loss_without_a_monitor():
    """One kNN value per trial (train.eval_every: 0) is no curve: the training loss per step is drawn."""
    lines = [{"trial_id": "t0", "epoch": e, "step": 4 * e, "loss": 1.0 / e} for e in (1, 2, 3)]
    monitored = pd.DataFrame(lines + [{"trial_id": "t0", "epoch": e, "step": 4 * e, "knn_acc": 0.5 + e / 10} for e in (1, 3)])
    x, y, points = learning_curve_points(monitored, "knn_acc")
    assert (x, y) == ("epoch", "knn_acc") and list(points["knn_acc"]) == [0.6, 0.8]
    final_only = pd.DataFrame(lines + [{"trial_id": "t0", "epoch": 3, "step": 12, "knn_acc": 0.8}])
    x, y, points = learning_curve_points(final_only, "knn_acc")
    assert (x, y) == ("step", "loss") and list(points["step"]) == [4, 8, 12]


def test_partial_parquet_of_a_running_sweep(tmp_path):
    """Only a failed trial has finished, another runs: the report says what is missing."""
    make_trial(tmp_path, "t0000", "failed", rho=0.01, knn=(0.1,), result=False, error="boom")
    make_trial(tmp_path, "t0001", "running", rho=1.0, knn=(0.3, 0.4), result=False)
    ResultsWriter(tmp_path, "partial").write(Ledger(tmp_path).all())
    folder = analyze(tmp_path)
    text = (folder / "report.md").read_text()
    assert "(no rows yet)" in text and "not enough data yet" in text
    # the running trial's learning curve is there already (metrics.parquet holds live lines)
    assert (folder / "learning_curves.png").is_file()


def test_analyze_command_line(sweep_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "analyze.py"), str(sweep_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "report.md" in proc.stdout and "acc_vs_rho.png" in proc.stdout
    missing = subprocess.run([sys.executable, str(REPO / "launch" / "analyze.py"), str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "results.parquet does not exist" in missing.stderr
