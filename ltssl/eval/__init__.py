"""Evaluation of a frozen encoder: features, kNN, linear probe, accuracy by class group.

All accuracies are fractions in [0, 1]. The protocol follows the long-tailed SSL
literature (SDCLR, Jiang et al. 2021; BCL, Zhou et al. 2022; Liu et al. 2022):
the encoder is trained on the LT set; kNN and the linear probe are fitted on a
*balanced* subset of the training images (the probe set) and scored on the
balanced test set; many/medium/few accuracies are the accuracy over the test
images whose class is in that group.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size() -> int:
    """Processes in the job's process group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` ``[n_r, ...]`` (n_r may differ across ranks)."""
    if world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    padded = x.new_zeros((most,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, batches: Iterable[dict], device, *, amp: bool = False,
                     channels_last: bool = False, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of a whole (evaluation) set, ordered by sample index.

    ``batches`` yields dicts with ``image`` ``[B,3,S,S]``, ``label`` ``[B]``, ``index`` ``[B]``
    (an :class:`ltssl.data.ffcv.EvalLoader`; under DDP a distributed one: each rank's shard is
    gathered, and samples the sampler served twice are kept once). Returns ``features``
    ``[N, D]`` float32 (L2-normalised when ``normalize``) and ``labels`` ``[N]``, on ``device``,
    row i = sample index i. The encoder is put in eval mode and restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device)
    feats, labels, indices = [], [], []
    try:
        for batch in batches:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):  # bf16 on CUDA or the CPU
                f = encoder(x)
            feats.append(f.float())
            labels.append(batch["label"].to(device).long())
            indices.append(batch["index"].to(device).long())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch")
    feats, labels, indices = (_gather_rows(torch.cat(t)) for t in (feats, labels, indices))
    n = int(indices.max().item()) + 1
    out_f = feats.new_zeros(n, feats.shape[1])
    out_l = torch.full((n,), -1, dtype=torch.long, device=feats.device)
    out_f[indices] = feats
    out_l[indices] = labels
    if (out_l < 0).any():
        missing = int((out_l < 0).sum())
        raise ValueError(f"extract_features: {missing} of {n} sample indices were never served")
    if normalize:
        out_f = F.normalize(out_f, dim=1)
    return out_f, out_l


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote ``exp(sim / T)``.

    ``bank`` ``[N, D]``, ``queries`` ``[M, D]`` (L2-normalised); returns predicted labels ``[M]``.
    """
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ bank.T  # [m, N]
        top_sim, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[top_idx], torch.exp(top_sim / temperature))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int, *,
                 epochs: int = 50, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0) -> torch.Tensor:
    """A linear classifier on frozen (cached) features; returns predictions on ``test_x`` ``[M]``.

    Features are standardised with the training mean and std (so one learning rate suits any
    encoder); SGD, momentum 0.9, cosine learning rate, cross-entropy, ``epochs`` passes over
    ``train_x`` ``[N, D]`` in shuffled mini-batches drawn from a generator seeded with ``seed``.
    """
    device = train_x.device
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(head(xtr[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        return head(xte).argmax(1)


def per_class_accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy of each class ``[C]`` (None for a class absent from ``labels``)."""
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    return [float(c / t) if t > 0 else None for c, t in zip(correct.tolist(), total.tolist())]


def group_accuracy(preds: torch.Tensor, labels: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float | None]:
    """``acc_<group>``: accuracy over the samples whose class is in the group (None if it has none)."""
    out = {}
    for name, classes in groups.items():
        member = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype, device=labels.device))
        n = int(member.sum())
        out[f"acc_{name}"] = float((preds[member] == labels[member]).double().mean()) if n else None
    return out


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds == labels).double().mean())


def linear_report(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                  eval_cfg, groups: dict[str, list[int]] | None = None, seed: int = 0) -> dict:
    """Linear-probe accuracy overall, per class and per group on cached features.

    Returns ``linear_acc``, ``per_class_acc`` (list) and ``acc_<group>`` for each group.
    """
    preds = linear_probe(train[0], train[1], test[0], num_classes, epochs=eval_cfg.linear_epochs, lr=eval_cfg.linear_lr,
                         batch_size=eval_cfg.linear_batch_size, seed=seed)
    out = {"linear_acc": accuracy(preds, test[1]), "per_class_acc": per_class_accuracy(preds, test[1], num_classes)}
    out.update(group_accuracy(preds, test[1], groups or {}))
    return out


__all__ = ["world_size", "extract_features", "knn_predict", "linear_probe", "per_class_accuracy", "group_accuracy", "accuracy", "linear_report"]
