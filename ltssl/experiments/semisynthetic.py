"""The semi-synthetic experiment of Liu, HaoChen, Gaidon and Ma (ICLR 2022, sec. 3.3).

Question: does SSL learn features of rare classes from the *frequent* images, where supervised
learning (SL) does not? The data (``data.semi_synthetic: true``, built by
:mod:`ltssl.data.prepare`): the classes are split into frequent (first half of the class order)
and rare (second half) ones; with the long-tail profile on top, each training image of a
frequent class carries an image of a rare class beside it (``own | rare partner``, 2:1), and
each rare-class image a blank half. Labels are the left image's class. Test and probe images
are ``own | blank``.

Four arms, all on the same data and encoder architecture:

- ``ssl``: the SSL method of the sweep (SimSiam by default) on all training images;
- ``supervised``: cross-entropy on the left-image labels of all training images;
- ``supervised_rare``: cross-entropy on the rare-class training images only (method
  ``supervised_rare``, :mod:`ltssl.methods.supervised_rare`: frequent-class samples get loss weight 0); what labels of the
  rare classes alone teach;
- ``random``: the encoder at its random initialisation (``torch.manual_seed(train.seed)``), not
  trained: the floor every learned representation should beat.

Evaluation (the paper's question): the frozen encoder's L2-normalised features; a linear probe
(:func:`ltssl.eval.linear_probe`, ``cfg.eval`` settings) and a kNN classifier fitted on the
probe set's **rare-class** images (balanced) and scored on the test set's rare-class images,
as a classification among the rare classes only (``rare_linear_acc``, ``rare_knn_acc``),
and a linear probe on 5 labelled images per rare class (``rare_fewshot_acc``, mean of 5 draws: with
many labelled probe images even random features separate digits); the same among the frequent
classes for reference. SSL beating SL there, with SL close to
``supervised_rare``, is the paper's finding (SL ignores the right half it has no label for).

Grad-CAM (:func:`ltssl.eval.gradcam.gradcam`, target: the squared norm of the encoder's
feature) on frequent-class training images shows where each encoder looks; the right-half
share of the map's mass, averaged over up to 200 such images, puts a number on it.

Entry points: :func:`analyze` (called by the sweep report for a semi-synthetic sweep, or
``python -m ltssl.experiments.semisynthetic <sweep-output-dir>``), :func:`evaluate_encoder`,
:func:`random_encoder`, :func:`load_run_encoder`, :func:`gradcam_grid`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltssl.config import Config, ConfigError, load_config
from ltssl.data import prepare_dataset
from ltssl.data.ffcv import EvalLoader, read_labels
from ltssl.data.sources import load_source
from ltssl.eval import accuracy, extract_features, knn_predict, linear_probe
from ltssl.eval.gradcam import gradcam
from ltssl.io import atomic_write_text
from ltssl.methods import method_class
from ltssl.methods.supervised_rare import SupervisedRare, semi_classes  # noqa: F401  (re-exported)
from ltssl.models import build_backbone
from ltssl.results import read_results

ARMS = ("ssl", "supervised", "supervised_rare", "random")
GRADCAM_STAT_IMAGES = 200


def _name(arm: str, method: str) -> str:
    """Row / column name: the SSL method's own name for the SSL arm, else the arm."""
    return method if arm == "ssl" else arm


def arm_of(cfg: Config) -> str:
    """The experiment arm a trained run belongs to, from its config."""
    if cfg.method.name == "supervised":
        return "supervised"
    if cfg.method.name == "supervised_rare":
        return "supervised_rare"
    return "ssl"


# ----------------------------------------------------------------------------- encoders


def random_encoder(cfg: Config, seed: int | None = None) -> nn.Module:
    """The ``cfg.model.backbone`` encoder at its random initialisation (seed: ``train.seed``)."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return build_backbone(cfg.model, cfg.data.image_size)


def load_run_encoder(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Config, nn.Module, object]:
    """(config, trained encoder, prepared dataset) of a finished training run folder."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist: the run did not finish an epoch")
    data = prepare_dataset(cfg.data)
    method = method_class(cfg)(cfg, build_backbone(cfg.model, cfg.data.image_size), data.num_classes)
    state = torch.load(ckpt, map_location=device, weights_only=True)
    method.load_state_dict(state["model"])
    return cfg, method.encoder.to(device).eval(), data


# ----------------------------------------------------------------------------- evaluation


_LOADERS: dict = {}


def _eval_loader(beton, device, indices=None):
    """An EvalLoader, reused across encoders: every new FFCV loader pays seconds of numba compilation."""
    key = (str(beton), str(device), None if indices is None else tuple(int(i) for i in indices))
    if key not in _LOADERS:
        if len(_LOADERS) >= 8:
            _LOADERS.clear()
        _LOADERS[key] = EvalLoader(beton, batch_size=256, device=device, num_workers=1,
                                   indices=None if indices is None else np.asarray(indices))
    return _LOADERS[key]


def _features(encoder: nn.Module, beton, device) -> tuple[torch.Tensor, torch.Tensor]:
    return extract_features(encoder, _eval_loader(beton, device), device)


def subset_accuracy(bank, bank_labels, test, test_labels, classes, eval_cfg, seed: int = 0) -> dict:
    """Linear-probe and kNN accuracy among ``classes`` only (labels re-indexed 0..len-1)."""
    classes_t = torch.as_tensor(list(classes), dtype=torch.long, device=bank_labels.device)
    remap = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long, device=bank_labels.device)
    remap[classes_t] = torch.arange(len(classes), device=bank_labels.device)
    tr = torch.isin(bank_labels, classes_t)
    te = torch.isin(test_labels, classes_t)
    xtr, ytr = bank[tr], remap[bank_labels[tr]]
    xte, yte = test[te], remap[test_labels[te]]
    out = {"knn_acc": accuracy(knn_predict(xtr, ytr, xte, len(classes), k=eval_cfg.knn_k,
                                           temperature=eval_cfg.knn_temperature), yte)}
    epochs = max(1, eval_cfg.linear_epochs)
    preds = linear_probe(xtr, ytr, xte, len(classes), epochs=epochs, lr=eval_cfg.linear_lr,
                         batch_size=eval_cfg.linear_batch_size, seed=seed)
    out["linear_acc"] = accuracy(preds, yte)
    return out


def few_shot_accuracy(bank, bank_labels, test, test_labels, classes, eval_cfg, *, shots: int, draws: int,
                      seed: int = 0) -> float:
    """Mean linear-probe accuracy among ``classes`` when only ``shots`` probe images per class are labelled.

    ``draws`` independent draws of the labelled images (numpy PCG64 seeded with ``(seed, draw)``);
    the test set is the same every time.
    """
    accs = []
    labels_np = bank_labels.cpu().numpy()
    for draw in range(draws):
        rng = np.random.default_rng([seed, draw])
        keep = np.concatenate([rng.choice(np.flatnonzero(labels_np == c), size=min(shots, int((labels_np == c).sum())),
                                          replace=False) for c in classes])
        keep_t = torch.as_tensor(np.sort(keep), device=bank.device)
        accs.append(subset_accuracy(bank[keep_t], bank_labels[keep_t], test, test_labels, classes, eval_cfg,
                                    seed=seed + draw)["linear_acc"])
    return float(np.mean(accs))


@torch.no_grad()
def evaluate_encoder(encoder: nn.Module, data, eval_cfg, *, device="cpu", seed: int = 0, shots: int = 5,
                     draws: int = 5) -> dict:
    """Accuracies of a frozen encoder among the rare (and the frequent) classes only.

    ``rare_linear_acc``, ``rare_knn_acc``: probe / kNN fitted on every probe-set image of the rare
    classes; ``rare_fewshot_acc``: linear probe on ``shots`` labelled images per rare class (mean
    of ``draws`` draws), where the representation, not the probe's data, has to carry the class;
    the same three for the frequent classes. Scored on the test set's images of those classes.
    """
    frequent, rare = semi_classes(data)
    encoder = encoder.to(device)
    bank, bank_labels = _features(encoder, data.probe_beton, device)
    test, test_labels = _features(encoder, data.test_beton, device)
    out = {}
    for name, classes in (("rare", rare), ("frequent", frequent)):
        acc = subset_accuracy(bank, bank_labels, test, test_labels, classes, eval_cfg, seed=seed)
        out[f"{name}_linear_acc"] = acc["linear_acc"]
        out[f"{name}_knn_acc"] = acc["knn_acc"]
        out[f"{name}_fewshot_acc"] = few_shot_accuracy(bank, bank_labels, test, test_labels, classes, eval_cfg,
                                                       shots=shots, draws=draws, seed=seed)
    return out


# ----------------------------------------------------------------------------- Grad-CAM


def carrier_indices(data, limit: int | None = None) -> list[int]:
    """Training-file positions of frequent-class images that carry a rare-class half (file order)."""
    partners = data.manifest["semi_synthetic"]["partners"]
    idx = [i for i, p in enumerate(partners) if p >= 0]
    return idx if limit is None else idx[:limit]


def pick_gradcam_images(data, n: int) -> list[int]:
    """``n`` carrier images, one per frequent class in turn (deterministic: file order)."""
    labels = read_labels(data.train_beton)
    by_class: dict[int, list[int]] = {}
    for i in carrier_indices(data):
        by_class.setdefault(int(labels[i]), []).append(i)
    chosen, depth = [], 0
    while len(chosen) < n and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(chosen) < n:
                chosen.append(by_class[c][depth])
        depth += 1
    return chosen


def _train_images(data, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, index = [], [], []
    for batch in _eval_loader(data.train_beton, device, indices):
        images.append(batch["image"])
        labels.append(batch["label"])
        index.append(batch["index"])
    images, labels, index = torch.cat(images), torch.cat(labels), torch.cat(index)
    row_of = {int(v): k for k, v in enumerate(index.tolist())}  # whatever order the loader serves, keep the caller's
    sel = torch.tensor([row_of[i] for i in indices])
    return images[sel], labels[sel]


def right_half_share(cams: torch.Tensor) -> torch.Tensor:
    """Per map [B, H, W]: the share of its mass in the right half (the carried rare-class image)."""
    w = cams.shape[-1]
    total = cams.flatten(1).sum(1).clamp_min(1e-12)
    return cams[..., w // 2:].flatten(1).sum(1) / total


def gradcam_stats(encoders: dict[str, nn.Module], data, device="cpu", limit: int = GRADCAM_STAT_IMAGES) -> dict[str, float]:
    """Mean right-half share of the Grad-CAM mass per encoder, over up to ``limit`` carrier images."""
    idx = carrier_indices(data, limit)
    images, _ = _train_images(data, idx, device)
    return {name: float(right_half_share(gradcam(enc.to(device), images)).mean()) for name, enc in encoders.items()}


def gradcam_grid(encoders: dict[str, nn.Module], data, path: str | Path, *, n_images: int = 6, device="cpu") -> Path:
    """One PNG: rows = carrier training images, columns = the image and each encoder's Grad-CAM overlay.

    Images are shown at their stored 2:1 shape (the encoders see them resized to S x S); a dashed
    line marks the halves; each overlay's title gives the right-half share of that map.
    """
    # deferred: matplotlib is slow to import and only the Grad-CAM figure needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    idx = pick_gradcam_images(data, n_images)
    images, labels = _train_images(data, idx, device)
    norm = data.manifest["normalization"]
    mean = torch.tensor(norm["mean"], device=images.device)[:, None, None]
    std = torch.tensor(norm["std"], device=images.device)[:, None, None]
    shape = data.manifest["files"]["train"].get("image_shape") or [images.shape[-2], 2 * images.shape[-1]]
    out_hw = (int(shape[0]) * 4, int(shape[1]) * 4)
    shown = F.interpolate((images * std + mean).clamp(0, 1), size=out_hw, mode="bilinear", align_corners=False)
    partners = data.manifest["semi_synthetic"]["partners"]
    pool_labels = _pool_labels(data)
    cams = {name: gradcam(enc.to(device), images) for name, enc in encoders.items()}
    cols = 1 + len(encoders)
    fig, axes = plt.subplots(len(idx), cols, figsize=(2.6 * cols, 1.45 * len(idx) + 0.6), squeeze=False)
    for r, i in enumerate(idx):
        img = shown[r].permute(1, 2, 0).cpu().numpy()
        ax = axes[r, 0]
        ax.imshow(img)
        partner_label = pool_labels[partners[i]] if pool_labels is not None else "?"
        ax.set_title(f"label {int(labels[r])} | carries {partner_label}", fontsize=8)
        for c, (name, cam) in enumerate(cams.items(), start=1):
            m = F.interpolate(cam[r][None, None], size=out_hw, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            ax = axes[r, c]
            ax.imshow(img)
            ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            share = float(right_half_share(cam[r][None]))
            ax.set_title(f"{name}: right {share:.0%}", fontsize=8)
        for ax in axes[r]:
            ax.axvline(out_hw[1] / 2 - 0.5, color="white", linestyle="--", linewidth=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Grad-CAM on semi-synthetic training images (left: own class, right: carried rare-class image)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _pool_labels(data):
    """Class id of every pool position of the source (to name the carried image's class), or None."""
    try:
        opts = data.manifest["config"]
        return load_source(opts["dataset"], data.manifest["source"]["root"] or opts["root"]).train_labels.tolist()
    except Exception:  # naming the partner's class is a caption nicety, never a reason to fail
        return None


# ----------------------------------------------------------------------------- the analysis of a sweep


def _fmt_pm(values: list[float]) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _evaluate_trials(output_dir: Path, device: str) -> tuple[list[dict], dict, dict, dict]:
    """Evaluate every completed semi-synthetic trial's encoder, plus a random encoder per seed.

    Returns (rows, encoders_by_seed {seed: {column name: encoder}}, data_by_seed, cfg_by_seed).
    """
    results, _, _ = read_results(output_dir)
    rows, encoders_by_seed, data_by_seed, cfg_by_seed = [], {}, {}, {}
    for rec in results.to_dict("records"):
        if rec.get("status") != "completed" or not isinstance(rec.get("config_json"), str):
            continue
        if not json.loads(rec["config_json"]).get("data", {}).get("semi_synthetic"):
            continue
        cfg, encoder, data = load_run_encoder(output_dir / "trials" / rec["trial_id"], device)
        arm = arm_of(cfg)
        scores = evaluate_encoder(encoder, data, cfg.eval, device=device, seed=cfg.train.seed)
        rows.append({"arm": arm, "method": cfg.method.name, "seed": cfg.train.seed, "trial_id": rec["trial_id"],
                     "linear_acc_all": rec.get("linear_acc"), **scores})
        # one column per SSL method (several may be swept), one per other arm
        encoders_by_seed.setdefault(cfg.train.seed, {})[_name(arm, cfg.method.name)] = encoder
        data_by_seed[cfg.train.seed] = data
        cfg_by_seed.setdefault(cfg.train.seed, cfg)
    for seed, cfg in sorted(cfg_by_seed.items()):
        enc = random_encoder(cfg, seed).eval()
        scores = evaluate_encoder(enc, data_by_seed[seed], cfg.eval, device=device, seed=seed)
        rows.append({"arm": "random", "method": f"{cfg.model.backbone} (init)", "seed": seed, "trial_id": None,
                     "linear_acc_all": None, **scores})
        encoders_by_seed[seed]["random"] = enc
    return rows, encoders_by_seed, data_by_seed, cfg_by_seed


_SCORES = ("rare_linear_acc", "rare_knn_acc", "rare_fewshot_acc", "frequent_linear_acc", "frequent_knn_acc",
           "frequent_fewshot_acc")


def _summary_table(df: pd.DataFrame, names: list[str], share: dict[str, float]) -> pd.DataFrame:
    """One row per arm column: mean ± std over seeds of every score, and the Grad-CAM right-half share."""
    table = []
    for name in names:
        part = df[df["name"] == name]
        table.append({
            "arm": part["arm"].iloc[0], "method": part["method"].iloc[0], "seeds": len(part),
            **{score: _fmt_pm(part[score].tolist()) for score in _SCORES},
            "gradcam_right_share": f"{share[name]:.2f}" if name in share else "-",
        })
    return pd.DataFrame(table)


def analyze(output_dir: str | Path, report_dir: str | Path | None = None, *, device: str = "cpu",
            gradcam_images: int = 6, gradcam_stat_images: int = GRADCAM_STAT_IMAGES) -> dict:
    """The semi-synthetic table and Grad-CAM grid of a finished (or running) sweep.

    Reads ``results.parquet``; for every completed semi-synthetic trial loads its encoder from
    ``trials/<trial_id>/checkpoints/last.pt``, evaluates it on the rare classes; adds a random
    encoder per seed. Writes ``semisynthetic.csv|md`` and ``gradcam_semisynthetic.png`` into
    ``report_dir`` (default ``<output_dir>/report``). Returns ``{"rows": [...], "markdown": str,
    "png": path or None, "gradcam_right_share": {...}}``.
    """
    output_dir = Path(output_dir)
    report = Path(report_dir) if report_dir else output_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    rows, encoders_by_seed, data_by_seed, _ = _evaluate_trials(output_dir, device)
    out = {"rows": rows, "markdown": "", "png": None, "gradcam_right_share": {}}
    if not rows:
        out["markdown"] = "(no completed semi-synthetic trial yet)\n"
        atomic_write_text(report / "semisynthetic.md", out["markdown"])
        return out
    df = pd.DataFrame(rows)
    seed0 = min(encoders_by_seed)
    df["name"] = [_name(a, m) for a, m in zip(df["arm"], df["method"])]
    names = sorted(dict.fromkeys(df["name"]), key=lambda n: ARMS.index(df[df["name"] == n]["arm"].iloc[0]))
    shown = {n: encoders_by_seed[seed0][n] for n in names if n in encoders_by_seed[seed0]}
    share = gradcam_stats(shown, data_by_seed[seed0], device, limit=gradcam_stat_images)
    out["gradcam_right_share"] = share
    tdf = _summary_table(df, names, share)
    df.drop(columns=["name"]).to_csv(report / "semisynthetic_runs.csv", index=False)
    atomic_write_text(report / "semisynthetic.csv", tdf.to_csv(index=False))
    header = "| " + " | ".join(tdf.columns) + " |\n| " + " | ".join("---" for _ in tdf.columns) + " |\n"
    body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in tdf.itertuples(index=False))
    frequent, rare = semi_classes(data_by_seed[seed0])
    md = (
        f"Rare classes {rare}, frequent classes {frequent}. Accuracies (fractions) of a linear probe / kNN fitted on the "
        "probe set and scored on the test set, among the rare (or frequent) classes only; fewshot: a linear probe on "
        "5 labelled probe images per class (mean of 5 draws); mean ± std over seeds. "
        "gradcam_right_share: mean share of the Grad-CAM mass on the carried rare-class half of "
        f"up to {gradcam_stat_images} frequent-class training images (seed {seed0}).\n\n" + header + body
    )
    ssl_names = [n for n in names if df[df["name"] == n]["arm"].iloc[0] == "ssl"]
    if ssl_names and "supervised" in shown:
        png = gradcam_grid({k: shown[k] for k in ssl_names + ["supervised"]}, data_by_seed[seed0],
                           report / "gradcam_semisynthetic.png", n_images=gradcam_images, device=device)
        out["png"] = png
        md += f"\n![Grad-CAM of the SSL and supervised encoders]({png.name})\n"
    out["markdown"] = md
    atomic_write_text(report / "semisynthetic.md", md)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltssl.experiments.semisynthetic",
                                description="Semi-synthetic table and Grad-CAM grid of a sweep output folder.")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--report-dir", type=Path)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = analyze(args.output_dir, args.report_dir, device=args.device)
    print(out["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
