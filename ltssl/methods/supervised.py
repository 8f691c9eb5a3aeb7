"""Supervised baseline (the SL side of Delta(n, r)): cross-entropy of a linear head on labels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltssl.methods.registry import register_method
from ltssl.methods.base import Method


@register_method("supervised")
class Supervised(Method):
    """Linear classifier on the encoder; per-sample loss = mean over views of CE(logits, label)."""

    min_views = 1

    def __init__(self, cfg, encoder, num_classes):
        super().__init__(cfg, encoder, num_classes)
        self.classifier = nn.Linear(encoder.out_dim, num_classes)

    def embed(self, view):
        return {"logits": self.classifier(self.encoder(view))}

    def combine(self, outs, batch):
        return torch.stack([F.cross_entropy(o["logits"].float(), batch["label"], reduction="none") for o in outs]).mean(0)

    def pair_loss(self, out_a, out_b, batch):
        return self.combine([out_a, out_b], batch)
