"""Supervised on the rare classes only: the supervised_rare arm of the semi-synthetic experiment.

Liu et al. (ICLR 2022, sec. 3.3): what labels of the rare classes alone teach an encoder, beside
SSL and plain supervised learning on the same semi-synthetic data
(:mod:`ltssl.experiments.semisynthetic` runs the experiment).
"""

from __future__ import annotations

import torch

from ltssl.config import ConfigError
from ltssl.methods.registry import register_method
from ltssl.methods.supervised import Supervised


def semi_classes(data) -> tuple[list[int], list[int]]:
    """(frequent, rare) class ids of a prepared semi-synthetic dataset (from its manifest)."""
    semi = data.manifest.get("semi_synthetic")
    if not semi:
        raise ConfigError("data.semi_synthetic must be true for the semi-synthetic experiment, got false")
    return list(semi["frequent_classes"]), list(semi["rare_classes"])


@register_method("supervised_rare")
class SupervisedRare(Supervised):
    """Supervised baseline trained on the rare classes' images only (semi-synthetic arm).

    Per-sample loss ``CE(logits, label) * w`` with ``w_i = 1[y_i rare] * B / n_rare`` (``n_rare``:
    rare-class samples in this rank's batch of B, at least 1), so the batch mean is the mean
    cross-entropy over its rare-class samples and frequent-class images contribute no gradient.
    Caveat: with BatchNorm the frequent images still enter the batch statistics (``model.norm:
    group`` avoids that). The rare classes come from the prepared dataset's manifest.
    """

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        if not cfg.data.semi_synthetic:
            raise ConfigError("method supervised_rare needs data.semi_synthetic: true (it trains on the rare classes only)")
        # deferred: ltssl.data brings FFCV in, which a machine that only builds methods may lack
        from ltssl.data import prepare_dataset

        _, rare = semi_classes(prepare_dataset(cfg.data))
        self.register_buffer("rare_mask", torch.zeros(num_classes, dtype=torch.bool), persistent=False)
        self.rare_mask[rare] = True

    def sample_weight(self, batch):
        rare = self.rare_mask[batch["label"]].float()
        return rare * rare.shape[0] / rare.sum().clamp_min(1.0)
