"""Optimizers: SGD, SAM and rwSAM (SAM whose ascent uses re-weighted losses), the LR schedule.

``build_optimizer(optim_cfg, params)`` -> ``torch.optim.SGD`` or :class:`SAM` over SGD
(rwSAM is SAM plus :class:`ltssl.optim.weights.SampleWeights`; the re-weighting happens
in the training step, :func:`ltssl.train.train_step`).
"""

from __future__ import annotations

import math

import torch

from ltssl.optim.sam import SAM
from ltssl.optim.weights import SampleWeights, kde_weights, label_power_weights


def build_optimizer(optim_cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (``optim.name = sgd``) or SAM(SGD) (``sam``, ``rwsam``) over the trainable parameters.

    Weight decay applies to every parameter, as in the SimSiam CIFAR recipe and the authors'
    rwSAM code; the learning rate is set per step from :func:`learning_rate`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(params, **kwargs)
    return SAM(params, torch.optim.SGD, rho=optim_cfg.rho, adaptive=optim_cfg.adaptive, **kwargs)


def learning_rate(optim_cfg, step: int, steps_per_epoch: int, epochs: int) -> float:
    """LR at global ``step`` (0-based): linear warm-up over ``warmup_epochs``, then cosine to 0 or constant."""
    total = max(1, steps_per_epoch * epochs)
    warmup = steps_per_epoch * optim_cfg.warmup_epochs
    if step < warmup:
        return optim_cfg.lr * (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return optim_cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    return optim_cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


__all__ = ["SAM", "SampleWeights", "build_optimizer", "learning_rate", "kde_weights", "label_power_weights"]
