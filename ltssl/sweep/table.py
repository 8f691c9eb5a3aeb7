"""The results table printed at the end of a sweep: one line per trial, best first within each group."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ltssl.results import read_table
from ltssl.sweep.spec import ALIASES, SweepSpec

#: Accuracy columns shown beside the sweep's metric.
ACCURACIES = ("knn_acc", "linear_acc", "acc_few")


def _cell(v) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def print_results(path: Path, spec: SweepSpec, console) -> None:
    """Print ``path`` (results.parquet) as a table on ``console``."""
    df = read_table(path).to_pandas()
    if df.empty:
        console.print("no trial has finished")
        return
    axes: list[str] = []
    for text in df["params_json"]:
        axes += [k for k in json.loads(text) if k not in axes]
    short = {dotted: alias for alias, dotted in ALIASES.items()}
    asc = spec.mode == "min"
    metric = spec.metric if spec.metric in df.columns else "knn_acc"
    df = df.sort_values(["group", metric], ascending=[True, asc], na_position="last")
    table = Table(title=f"results ({len(df)} trials; {path})", box=None, header_style="bold")
    # "method.tase.enabled" -> "tase.enabled": the section is clear from the name, the width is not free
    columns = ["trial", "status", *[short.get(a, a.split(".", 1)[-1]) for a in axes], "epochs", metric]
    columns += [c for c in ACCURACIES if c != metric] + ["job"]
    for col in columns:
        table.add_column(col, no_wrap=True)
    for _, row in df.iterrows():
        params = json.loads(row["params_json"])
        accs = [_cell(row[c]) for c in ACCURACIES if c != metric]
        table.add_row(row["trial_id"], row["status"], *[_cell(params.get(a)) for a in axes],
                      _cell(row["epochs_run"]), _cell(row[metric]), *accs, _cell(row["slurm_job_id"]))
    if console.is_terminal:
        console.print(table)
        return
    width, console.width = console.width, 240  # a log file has no width: do not cut the table to 80 columns
    try:
        console.print(table)
    finally:
        console.width = width
