"""The semi-synthetic experiment (rare-class evaluation, supervised-on-rare arm, random features),
Grad-CAM, and the experiment sweeps shipped in sweeps/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ltssl.config import ConfigError, load_config, save_config
from ltssl.eval.gradcam import gradcam
from ltssl.experiments import semisynthetic as semi

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Grad-CAM


class _RightHalfNet(nn.Module):
    """conv (positive weights, no bias) + ReLU + global mean: activations live where the input is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 0.1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_gradcam_highlights_where_the_feature_comes_from():
    x = torch.zeros(2, 3, 8, 16)
    x[0, :, 2:6, 10:14] = 1.0      # content only in the right half
    x[1, :, 2:6, 1:5] = 1.0        # only in the left half
    cams = gradcam(_RightHalfNet(), x)
    assert cams.shape == (2, 8, 16) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    share = semi.right_half_share(cams)
    assert share[0] > 0.95 and share[1] < 0.05
    assert torch.allclose(semi.right_half_share(torch.ones(1, 4, 6)), torch.tensor([0.5]))


def test_gradcam_leaves_the_model_as_it_was():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten())
    net.train()
    before = [h for h in net[0]._forward_hooks]
    gradcam(net, torch.randn(2, 3, 8, 8), layer=net[2])      # an in-place ReLU as the layer works too
    assert net.training and list(net[0]._forward_hooks) == before and all(p.grad is None for p in net.parameters())


# ----------------------------------------------------------------------------- semi-synthetic data and arms


def _cfg(cache_dir, **over):
    base = {"data.semi_synthetic": True, "data.imbalance_ratio": 10, "data.image_size": 16, "data.num_workers": 1,
            "data.cache_dir": str(cache_dir), "model.backbone": "small_cnn", "method.proj_dim": 32,
            "method.proj_hidden_dim": 32, "method.pred_hidden_dim": 8, "eval.linear_epochs": 5, "train.seed": 0}
    base.update(over)
    return load_config(overrides=base)


@pytest.fixture(scope="module")
def semi_data(tmp_path_factory):
    from ltssl.data import prepare_dataset

    cache = tmp_path_factory.mktemp("semi-cache")
    cfg = _cfg(cache)
    return cfg, prepare_dataset(cfg.data)


def test_supervised_rare_trains_on_rare_class_images_only(semi_data):
    cfg, data = semi_data
    frequent, rare = semi.semi_classes(data)
    assert sorted(frequent + rare) == list(range(10)) and len(rare) == 5
    from ltssl.methods import build_method

    method = build_method(_cfg(cfg.data.cache_dir, **{"method.name": "supervised_rare"}), 10)
    labels = torch.tensor([frequent[0], rare[0], rare[1], frequent[1]])
    batch = {"label": labels, "index": torch.arange(4)}
    assert method.sample_weight(batch).tolist() == [0.0, 2.0, 2.0, 0.0]
    torch.manual_seed(0)
    views = [torch.randn(4, 3, 16, 16)]
    method.eval()
    loss = method(views, batch)
    ce = nn.functional.cross_entropy(method.classifier(method.encoder(views[0])), labels, reduction="none")
    assert torch.allclose(loss.mean(), ce[1:3].mean(), atol=1e-6)
    all_frequent = {"label": torch.tensor([frequent[0]] * 4), "index": torch.arange(4)}
    assert method.sample_weight(all_frequent).sum() == 0
    with pytest.raises(ConfigError, match="data.semi_synthetic"):
        build_method(_cfg(cfg.data.cache_dir, **{"method.name": "supervised_rare", "data.semi_synthetic": False}), 10)


def test_random_features_and_rare_class_evaluation_run(semi_data):
    cfg, data = semi_data
    enc = semi.random_encoder(cfg)
    again = semi.random_encoder(cfg)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    scores = semi.evaluate_encoder(enc, data, cfg.eval, seed=0)
    assert set(scores) == {f"{g}_{m}" for g in ("rare", "frequent") for m in ("linear_acc", "knn_acc", "fewshot_acc")}
    for v in scores.values():
        assert 0.0 <= v <= 1.0
    # five-way problems: even random conv features are far above chance (0.2) on digits
    assert scores["rare_knn_acc"] > 0.4 and scores["rare_linear_acc"] > 0.4


def test_subset_accuracy_is_computed_among_the_given_classes_only():
    bank = torch.nn.functional.normalize(torch.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]] + 0.01, dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    test = bank[[0, 2, 4, 6]]
    test_labels = torch.tensor([0, 1, 2, 3])
    eval_cfg = load_config(overrides={"eval.knn_k": 2, "eval.linear_epochs": 30}).eval
    acc = semi.subset_accuracy(bank, labels, test, test_labels, [2, 3], eval_cfg)
    assert acc == {"knn_acc": 1.0, "linear_acc": 1.0}


def test_gradcam_grid_and_analysis_of_a_semisynthetic_sweep_folder(semi_data, tmp_path):
    """A sweep folder with two finished trials (untrained checkpoints): the analysis writes its table and PNG."""
    import pandas as pd

    from ltssl.methods import build_method
    from ltssl.train import _build_encoder  # noqa: F401  (the trainer's module imports cleanly)

    cfg, data = semi_data
    out = tmp_path / "sweep"
    records = []
    for i, name in enumerate(["simsiam", "supervised"]):
        trial_cfg = _cfg(cfg.data.cache_dir, **{"method.name": name})
        run_dir = out / "trials" / f"t{i:04d}"
        (run_dir / "checkpoints").mkdir(parents=True)
        save_config(trial_cfg, run_dir / "config.yaml")
        torch.manual_seed(i + 1)
        torch.save({"model": build_method(trial_cfg, 10).state_dict()}, run_dir / "checkpoints" / "last.pt")
        records.append({"trial_id": f"t{i:04d}", "status": "completed", "linear_acc": 0.5,
                        "config_json": json.dumps({"data": {"semi_synthetic": True}})})
    pd.DataFrame(records).to_parquet(out / "results.parquet")
    result = semi.analyze(out, gradcam_images=3, gradcam_stat_images=24)
    arms = [r["arm"] for r in result["rows"]]
    assert arms == ["ssl", "supervised", "random"]
    md = (out / "report" / "semisynthetic.md").read_text()
    assert "| ssl | simsiam |" in md and "| supervised |" in md and "| random |" in md and "gradcam_semisynthetic.png" in md
    png = out / "report" / "gradcam_semisynthetic.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["gradcam_right_share"]) == {"simsiam", "supervised", "random"}
    assert all(0 <= v <= 1 for v in result["gradcam_right_share"].values())
    table = pd.read_csv(out / "report" / "semisynthetic.csv")
    assert list(table["arm"]) == ["ssl", "supervised", "random"]


def test_pick_gradcam_images_cycles_through_frequent_classes(semi_data):
    _, data = semi_data
    from ltssl.data.ffcv import read_labels

    idx = semi.pick_gradcam_images(data, 5)
    labels = read_labels(data.train_beton)
    partners = data.manifest["semi_synthetic"]["partners"]
    frequent, _ = semi.semi_classes(data)
    assert len(idx) == 5 and all(partners[i] >= 0 for i in idx)
    assert sorted(int(labels[i]) for i in idx) == sorted(frequent)


# ----------------------------------------------------------------------------- the shipped experiment sweeps


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "sweeps").glob("*/*.yaml")
                                        if p.stem in ("semisynthetic", "baselines")))
def test_experiment_sweeps_plan_valid_trials(path):
    from ltssl.methods import method_class
    from ltssl.sweep.spec import load_sweep

    spec = load_sweep(REPO / path)
    trials = spec.validate_trials(None)
    assert trials
    for t in trials:
        method_class(load_config(t.config))   # TASE only on contrastive methods, filter only on SSL ones
    if path.endswith("baselines.yaml"):
        combos = {(t.config["method"]["name"], t.config["optim"]["name"], t.config["optim"]["weighting"],
                   t.config["method"]["tase"]["enabled"], t.config["data"]["num_views"]) for t in trials}
        for m in ("simclr", "simsiam", "moco_v2"):
            assert (m, "sgd", "none", False, 2) in combos
            assert (m, "sam", "none", False, 2) in combos
            assert (m, "rwsam", "label_power", False, 2) in combos and (m, "rwsam", "kde", False, 2) in combos
            assert any(c[0] == m and c[4] > 2 for c in combos)
        assert ("simclr", "sgd", "none", True, 2) in combos and ("moco_v2", "sgd", "none", True, 2) in combos
    if path.endswith("semisynthetic.yaml"):
        assert {t.config["method"]["name"] for t in trials} >= {"simsiam", "supervised", "supervised_rare"}
        assert all(t.config["data"]["semi_synthetic"] for t in trials)


# ----------------------------------------------------------------------------- digits' out-of-domain probe


def test_digits_ood_is_the_same_split_inverted_and_rotated():
    import numpy as np

    from ltssl.data.prepare import check_options, _options
    from ltssl.data.sources import load_source

    base, ood = load_source("digits"), load_source("digits_ood")
    assert ood.name == "digits_ood" and ood.checksum != base.checksum
    assert np.array_equal(ood.train_labels, base.train_labels) and np.array_equal(ood.test_labels, base.test_labels)
    assert np.array_equal(ood.test_images, 255 - np.rot90(base.test_images, k=1, axes=(1, 2)))
    check_options(_options(load_config(overrides={"data.ood_dataset": "digits_ood"}).data))   # no source folder needed
