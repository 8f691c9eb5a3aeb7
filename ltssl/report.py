"""The analysis of a sweep: tables (markdown + csv) and plots (PNG) from its parquet files only.

``python launch/analyze.py <output-dir>`` (or :func:`analyze`) reads ``results.parquet`` (and
``metrics.parquet`` for learning curves) and writes ``<output-dir>/report/``:

- ``report.md``: everything below, in one page;
- ``status.csv|md``: trials per status;
- ``summary.csv|md``: completed trials grouped by configuration (every swept value except the
  seeds): number of seeds, mean and std of kNN, linear, many/medium/few and OOD accuracy;
- ``best_per_ratio.csv|md``: per dataset, method, balanced/LT and imbalance ratio, the
  configuration (rho, weighting, ...) with the best mean of the sweep's metric, with mean +- std;
- ``delta.csv|md``: Delta(n, r) = (A(n, 1) - A(n, r)) / A(n, 1), the relative accuracy lost to
  imbalance at the same training-set size n (A(n, 1): trained on the balanced subset with the LT
  subset's n, ``data.balanced: true``), for SSL and supervised (SL) methods, in-domain (linear
  probe on the test set, kNN when there is no probe) and out-of-domain (``ood_linear_acc``).
  Pairs are matched on everything but ``balanced``; with several seeds Delta is computed per
  seed and averaged;
- ``acc_vs_rho.png``, ``delta_bars.png``, ``per_class_acc.png``, ``learning_curves.png``.

It works on the parquet of a running sweep (whatever has finished so far) and says what is
missing instead of failing. Accuracies are fractions in [0, 1]; tables show them as such.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ltssl.results import read_results

ACC_COLUMNS = ["knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few", "ood_linear_acc"]
SEED_AXES = {"train.seed", "data.seed"}
BASE_KEYS = ["dataset", "method", "balanced", "imbalance_ratio"]
#: Swept dotted keys that are results columns already.
STANDARD_COLUMNS = {
    "data.dataset": "dataset", "data.imbalance_ratio": "imbalance_ratio", "data.balanced": "balanced",
    "method.name": "method", "optim.name": "optimizer", "optim.rho": "rho", "optim.adaptive": "adaptive",
    "optim.weighting": "weighting", "optim.label_power_base": "label_power_base",
    "optim.kde_alpha": "kde_alpha", "optim.kde_bandwidth": "kde_bandwidth",
}


# ------------------------------------------------------------------------------ helpers


def _config_columns(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add one column per swept axis (from params_json) and return the configuration columns."""
    df = df.copy()
    axes: list[str] = []
    for text in df["params_json"].dropna():
        for key in json.loads(text):
            if key not in axes and key not in SEED_AXES:
                axes.append(key)
    extra = []
    for key in axes:
        if key in STANDARD_COLUMNS:
            extra.append(STANDARD_COLUMNS[key])  # already a results column
            continue
        df[f"p:{key}"] = [json.loads(t).get(key) if isinstance(t, str) else None for t in df["params_json"]]
        df[f"p:{key}"] = df[f"p:{key}"].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
        extra.append(f"p:{key}")
    # The standard hyperparameter columns too: grids of variants set them without naming them.
    cols = BASE_KEYS + ["optimizer", "weighting", "rho"] + extra
    return df, [c for c in dict.fromkeys(cols) if c in df.columns]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def _markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows yet)\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _write_table(df: pd.DataFrame, folder: Path, name: str) -> str:
    df.to_csv(folder / f"{name}.csv", index=False)
    text = _markdown(df)
    (folder / f"{name}.md").write_text(text)
    return text


def _pm(mean, std, n) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if n is None or n < 2 or std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


# ------------------------------------------------------------------------------ tables


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Completed trials grouped by configuration: seeds, mean and std of every accuracy."""
    done = results[results["status"] == "completed"]
    if done.empty:
        return pd.DataFrame()
    done, cols = _config_columns(done)
    rows = []
    for key, g in done.groupby(cols, dropna=False, sort=True):
        row = dict(zip(cols, key if isinstance(key, tuple) else (key,)))
        row["seeds"] = int(g["seed"].nunique())
        row["trials"] = len(g)
        row["n_train"] = g["n_train"].dropna().iloc[0] if g["n_train"].notna().any() else None
        for c in ACC_COLUMNS:
            vals = g[c].dropna()
            row[f"{c}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{c}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        row["trial_ids"] = ",".join(g["trial_id"])
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.rename(columns={c: c[2:] for c in out.columns if c.startswith("p:")})


def best_per_ratio(summary: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Per dataset/method/balanced/imbalance ratio: the configuration with the best mean metric."""
    if summary.empty:
        return pd.DataFrame()
    col = f"{metric}_mean" if f"{metric}_mean" in summary.columns else "knn_acc_mean"
    keys = [k for k in BASE_KEYS if k in summary.columns]
    rows = []
    for _, g in summary.groupby(keys, dropna=False, sort=True):
        g = g.dropna(subset=[col])
        if g.empty:
            continue
        best = g.loc[g[col].idxmax() if mode == "max" else g[col].idxmin()]
        row = {k: best[k] for k in keys}
        for k in ("optimizer", "weighting", "rho"):
            row[k] = best.get(k)
        for k in summary.columns:
            if (k.startswith(("optim.", "method.", "model.", "train.", "data.")) or k in STANDARD_COLUMNS.values()) \
                    and k not in SEED_AXES and k not in row and not k.endswith(("_mean", "_std")):
                row[k] = best[k]
        row["seeds"] = best["seeds"]
        row[f"{metric} (selected on)"] = _pm(best[col], best.get(col.replace("_mean", "_std")), best["seeds"])
        for c in ("knn_acc", "linear_acc", "acc_many", "acc_medium", "acc_few", "ood_linear_acc"):
            row[c] = _pm(best[f"{c}_mean"], best[f"{c}_std"], best["seeds"])
            row[f"{c}_mean"] = best[f"{c}_mean"]
        row["configs_compared"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def delta_table(results: pd.DataFrame) -> pd.DataFrame:
    """Delta(n, r) = (A(n,1) - A(n,r)) / A(n,1) for SSL and SL, in-domain and out-of-domain."""
    done = results[results["status"] == "completed"]
    if done.empty or done["balanced"].nunique() < 2:
        return pd.DataFrame()
    done, cols = _config_columns(done)
    match = [c for c in cols if c not in ("balanced", "p:data.balanced")]
    rows = []
    for key, g in done.groupby(match, dropna=False, sort=True):
        row_key = dict(zip(match, key if isinstance(key, tuple) else (key,)))
        bal, lt = g[g["balanced"] == True], g[g["balanced"] == False]  # noqa: E712 - pandas masks
        if bal.empty or lt.empty:
            continue
        for domain, column in (("ID", "linear_acc"), ("OOD", "ood_linear_acc")):
            col = column
            if domain == "ID" and (bal[col].isna().all() or lt[col].isna().all()):
                col = "knn_acc"
            b, l = bal.dropna(subset=[col]), lt.dropna(subset=[col])
            if b.empty or l.empty:
                continue
            seeds = sorted(set(b["seed"]) & set(l["seed"]))
            if seeds:
                per_seed = []
                for s in seeds:
                    a1 = float(b[b["seed"] == s][col].mean())
                    ar = float(l[l["seed"] == s][col].mean())
                    per_seed.append((a1 - ar) / a1 if a1 else float("nan"))
            else:
                a1, ar = float(b[col].mean()), float(l[col].mean())
                per_seed = [(a1 - ar) / a1 if a1 else float("nan")]
            deltas = np.array(per_seed, dtype=float)
            rows.append({
                "dataset": row_key.get("dataset"),
                "imbalance_ratio": row_key.get("imbalance_ratio"),
                "n_train": l["n_train"].dropna().iloc[0] if l["n_train"].notna().any() else None,
                "paradigm": "SL" if row_key.get("method") == "supervised" else "SSL",
                "method": row_key.get("method"),
                "optimizer": row_key.get("optimizer"),
                "rho": row_key.get("rho"),
                "domain": domain,
                "accuracy": col,
                "A_balanced": float(b[col].mean()),
                "A_lt": float(l[col].mean()),
                "delta": float(np.nanmean(deltas)),
                "delta_std": float(np.nanstd(deltas, ddof=1)) if len(deltas) > 1 else float("nan"),
                "seeds": len(per_seed),
            })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ plots


def _plt():
    # deferred: matplotlib is slow to import and only the plotting steps need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acc_vs_rho(results: pd.DataFrame, metric: str, path: Path) -> bool:
    """Accuracy against rho: one panel per dataset and method, one colour per imbalance ratio.

    Points are trials (x: stopped early), lines the mean over seeds at each rho; trials without a
    perturbation (SGD, or rho 0) are drawn as a dotted horizontal line: the baseline to beat.
    """
    df = results[(results["rho"].notna() | (results["optimizer"] == "sgd")) & results[metric].notna()
                 & results["status"].isin(["completed", "stopped_early"])]
    if df.empty or not (df["rho"] > 0).any():
        return False
    plt = _plt()
    panels = sorted({(d, m) for d, m in zip(df["dataset"], df["method"])}, key=str)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (dataset, method) in zip(axes[0], panels):
        d = df[(df["dataset"] == dataset) & (df["method"] == method)]
        ratios = sorted(d["imbalance_ratio"].unique())
        perturbed = d[(d["optimizer"] != "sgd") & (d["rho"] > 0)]
        for i, ratio in enumerate(ratios):
            color = cmap(i / max(1, len(ratios) - 1) * 0.85)
            at_ratio = d[d["imbalance_ratio"] == ratio]
            for balanced, b in at_ratio.groupby("balanced"):
                suffix = " balanced" if balanced else ""
                base = b[((b["optimizer"] == "sgd") | (b["rho"] == 0)) & (b["status"] == "completed")]
                if len(base):
                    ax.axhline(base[metric].mean(), color=color, linestyle=":", linewidth=1.4,
                               label=f"r={ratio:g}{suffix} {base['optimizer'].iloc[0]} baseline")
                pert = b[(b["optimizer"] != "sgd") & (b["rho"] > 0)]
                for (opt, weighting), g in pert.groupby(["optimizer", "weighting"]):
                    marker = {"kde": "o", "label_power": "s", "none": "^"}.get(weighting, "o")
                    comp = g[g["status"] == "completed"]
                    ax.scatter(comp["rho"], comp[metric], color=color, marker=marker, alpha=0.5, s=22)
                    stop = g[g["status"] == "stopped_early"]
                    if len(stop):
                        ax.scatter(stop["rho"], stop[metric], color=color, marker="x", alpha=0.7, s=26)
                    means = comp.groupby("rho")[metric].mean().sort_index()
                    if len(means):
                        ax.plot(means.index, means.values, color=color, marker=marker,
                                linestyle="--" if balanced else "-", label=f"r={ratio:g}{suffix} {opt}/{weighting}")
        rhos = perturbed["rho"]
        if len(rhos) and rhos.max() / rhos.min() > 4:
            ax.set_xscale("log")
        ax.set_xlabel("rho (optim.rho)")
        ax.set_ylabel(metric)
        ax.set_title(f"{dataset} {method}: {metric} vs rho\n(lines: mean over seeds; x: stopped early; dotted: no SAM)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_delta(delta: pd.DataFrame, path: Path) -> bool:
    """Delta(n, r) bars: SSL vs SL per imbalance ratio, in-domain and out-of-domain."""
    if delta.empty:
        return False
    plt = _plt()
    datasets = sorted(delta["dataset"].dropna().unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    colors = {("SSL", "ID"): "#1f77b4", ("SSL", "OOD"): "#9ecae1", ("SL", "ID"): "#d62728", ("SL", "OOD"): "#fc9272"}
    for ax, dataset in zip(axes[0], datasets):
        d = delta[delta["dataset"] == dataset]
        ratios = sorted(d["imbalance_ratio"].unique())
        series = [k for k in colors if ((d["paradigm"] == k[0]) & (d["domain"] == k[1])).any()]
        width = 0.8 / max(1, len(series))
        for j, (paradigm, domain) in enumerate(series):
            s = d[(d["paradigm"] == paradigm) & (d["domain"] == domain)].groupby("imbalance_ratio")
            means = s["delta"].mean().reindex(ratios)
            errs = s["delta_std"].mean().reindex(ratios).fillna(0)
            x = np.arange(len(ratios)) + (j - (len(series) - 1) / 2) * width
            ax.bar(x, means.values * 100, width, yerr=errs.values * 100, color=colors[(paradigm, domain)],
                   label=f"{paradigm} {domain}", capsize=3)
            for xi, v, e in zip(x, means.values, errs.values):
                if not np.isnan(v):
                    top = (v + e) * 100 if v >= 0 else (v - e) * 100
                    ax.text(xi, top, f"{v * 100:.1f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        ax.set_xticks(np.arange(len(ratios)), [f"r={r:g}" for r in ratios])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("Delta(n, r) = (A(n,1) - A(n,r)) / A(n,1)  [%]")
        ax.set_title(f"{dataset}: accuracy lost to imbalance at equal n")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def best_trials(results: pd.DataFrame, metric: str, mode: str) -> list[tuple]:
    """(dataset, ratio, balanced, method, row) of the completed trial with per-class accuracies
    that is best on the sweep's selection ``metric`` in each group (the best-configuration table's choice)."""
    df = results[(results["status"] == "completed") & results["per_class_acc"].notna() & results["class_counts"].notna()]
    picked = []
    for (dataset, ratio, balanced, method), g in df.groupby(["dataset", "imbalance_ratio", "balanced", "method"]):
        col = metric if metric in g.columns and g[metric].notna().any() else "linear_acc"
        g = g.dropna(subset=[col])
        if not g.empty:
            picked.append((dataset, ratio, balanced, method, g.loc[g[col].idxmax() if mode == "max" else g[col].idxmin()]))
    return picked


def plot_per_class(results: pd.DataFrame, metric: str, mode: str, path: Path) -> bool:
    """Per-class accuracy against the class's training images, for the best trial of each ratio.

    Balanced trials are left out: all their classes have the same size, so they draw a vertical
    line that says nothing about the tail.
    """
    picked = [p for p in best_trials(results, metric, mode) if not p[2]]
    if not picked:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    cmap = plt.get_cmap("plasma")
    for i, (dataset, ratio, balanced, method, row) in enumerate(picked):
        counts = np.asarray(row["class_counts"], dtype=float)
        accs = np.asarray(row["per_class_acc"], dtype=float)
        if len(counts) != len(accs):
            continue
        order = np.argsort(counts)
        color = cmap(i / max(1, len(picked) - 1) * 0.85)
        ax.plot(counts[order], accs[order], marker="o", color=color, alpha=0.8,
                label=f"{dataset} r={ratio:g}{' balanced' if balanced else ''} {method} {row['optimizer']}"
                      + (f" rho={row['rho']:.3g}" if pd.notna(row["rho"]) else "") + f" ({row['trial_id']})")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("per-class accuracy (linear probe)")
    ax.set_title(f"per-class accuracy vs class size (best trial per ratio on {metric})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def learning_curve_points(metrics: pd.DataFrame | None, metric: str) -> tuple[str, str, pd.DataFrame]:
    """(x column, y column, rows) of the learning curves: ``metric`` per epoch, or the training
    loss per step when no trial has two values of the metric."""
    if metrics is None or metrics.empty:
        return "epoch", metric, pd.DataFrame()
    m = pd.DataFrame()
    if metric in metrics.columns:
        # every line carrying the metric; the final line repeats the last evaluation's epoch: keep one
        m = metrics[metrics[metric].notna()].drop_duplicates(subset=["trial_id", "epoch"], keep="last")
        if not m.empty and m.groupby("trial_id").size().max() >= 2:
            return "epoch", metric, m
    if "loss" in metrics.columns:
        loss = metrics[metrics["loss"].notna() & metrics["step"].notna()].drop_duplicates(subset=["trial_id", "step"], keep="last")
        if not loss.empty:
            return "step", "loss", loss
    return "epoch", metric, m


def plot_learning_curves(results: pd.DataFrame, metrics: pd.DataFrame | None, metric: str, path: Path) -> bool:
    """The metric per epoch of every trial, one panel per group; stopped trials dashed.

    A sweep without a monitor (``train.eval_every: 0``) has one value of the metric per trial,
    which is no curve: the training loss per step is drawn instead.
    """
    x, y, m = learning_curve_points(metrics, metric)
    if m.empty:
        return False
    plt = _plt()
    info = results.set_index("trial_id")[["group", "status"]] if not results.empty else pd.DataFrame(columns=["group", "status"])
    m = m.join(info, on="trial_id")
    m["group"] = m["group"].fillna("(running)")
    groups = sorted(m["group"].unique())
    ncol = min(3, len(groups))
    nrow = math.ceil(len(groups) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for trial, g in m[m["group"] == group].groupby("trial_id"):
            g = g.sort_values(x)
            status = g["status"].iloc[0]
            ax.plot(g[x], g[y], linestyle="--" if status == "stopped_early" else "-", marker="." if x == "epoch" else None,
                    label=f"{trial} ({status if isinstance(status, str) else 'running'})")
        ax.set_title(group, fontsize=9)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel(x)
        ax.set_ylabel(y if y != "loss" else "training loss")
        ax.grid(alpha=0.3)
        if len(ax.lines) <= 12:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    what = f"{metric} per epoch" if y == metric else f"training loss per step (no {metric} monitor in this sweep)"
    fig.suptitle(f"learning curves: {what} (dashed: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def is_semisynthetic_sweep(results: pd.DataFrame) -> bool:
    """Whether a results table holds semi-synthetic trials (``data.semi_synthetic`` true in a config)."""
    return any(isinstance(text, str) and json.loads(text).get("data", {}).get("semi_synthetic")
               for text in results.get("config_json", []))


# ------------------------------------------------------------------------------ the report


def analyze(output_dir: str | Path, report_dir: str | Path | None = None) -> Path:
    """Write the report folder of a sweep from its parquet files; returns the folder."""
    output_dir = Path(output_dir)
    results, metrics, meta = read_results(output_dir)
    folder = Path(report_dir) if report_dir is not None else output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    metric = meta.get("metric") or "knn_acc"
    mode = meta.get("mode") or "max"
    plot_metric = metric if metric in results.columns and results[metric].notna().any() else "knn_acc"

    status = results.groupby("status").size().rename("trials").reset_index() if not results.empty else pd.DataFrame()
    summary = summary_table(results)
    best = best_per_ratio(summary, metric, mode)
    delta = delta_table(results)

    parts = [f"# Sweep report: {meta.get('sweep_id') or output_dir.name}\n",
             f"{len(results)} finished trials in results.parquet; selection metric: {metric} ({mode}).\n"]
    parts += ["## Trials per status\n", _write_table(status, folder, "status")]
    best_view = best[[c for c in best.columns if not c.endswith("_mean")]] if not best.empty else best
    parts += ["## Best configuration per imbalance ratio (mean ± std over seeds)\n", _write_table(best_view, folder, "best_per_ratio")]
    summary_view = summary.drop(columns=["trial_ids"]) if "trial_ids" in summary.columns else summary
    parts += ["## Every configuration (completed trials, mean and std over seeds)\n", _write_table(summary_view, folder, "summary")]
    summary.to_csv(folder / "summary.csv", index=False)
    delta_text = _write_table(delta, folder, "delta")
    if delta.empty:
        delta_text = "(needs completed trials with data.balanced true and false at the same settings)\n"
    parts += ["## Delta(n, r) = (A(n,1) − A(n,r)) / A(n,1): SSL vs supervised, in- and out-of-domain\n", delta_text]
    if is_semisynthetic_sweep(results):
        from ltssl.experiments.semisynthetic import analyze as semisynthetic_analysis  # torch: only for these sweeps

        parts += ["## Semi-synthetic experiment: rare-class accuracy of SSL, SL, SL on rare classes only, random features\n",
                  semisynthetic_analysis(output_dir, folder)["markdown"]]

    plots = [
        ("acc_vs_rho.png", plot_acc_vs_rho(results, plot_metric, folder / "acc_vs_rho.png"), f"{plot_metric} vs rho per imbalance ratio"),
        ("delta_bars.png", plot_delta(delta, folder / "delta_bars.png"), "Delta(n, r): SSL vs SL, ID and OOD"),
        ("per_class_acc.png", plot_per_class(results, metric, mode, folder / "per_class_acc.png"), "per-class accuracy vs class size"),
        ("learning_curves.png", plot_learning_curves(results, metrics, "knn_acc", folder / "learning_curves.png"), "learning curves"),
    ]
    parts.append("## Plots\n")
    for name, made, what in plots:
        parts.append(f"![{what}]({name})\n" if made else f"- {what}: not enough data yet\n")
    (folder / "report.md").write_text("\n".join(parts))
    return folder
