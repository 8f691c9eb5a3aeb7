"""Backbones, the method registry, the losses, the view pairing, state updates, and loss decrease."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltssl.config import load_config
from ltssl.methods import METHODS, build_method
from ltssl.methods.base import frozen_bn_stats, info_nce, nt_xent, view_pairs
from ltssl.models import BACKBONES, UnknownNameError, build_backbone
from ltssl.train import check_names

SMALL = {"proj_dim": 32, "proj_hidden_dim": 32, "pred_hidden_dim": 8, "moco_queue_size": 64, "temperature": 0.2}


def _cfg(name, norm="batch", **method):
    return load_config({"model": {"backbone": "small_cnn", "norm": norm}, "data": {"image_size": 8},
                        "method": {"name": name, **SMALL, **method}})


def _batch(n=16, views=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 8, 8, generator=gen) for _ in range(views)],
            "label": torch.randint(0, 4, (n,), generator=gen), "index": torch.arange(n)}


@pytest.mark.parametrize("backbone,dim", [("small_cnn", 128), ("resnet18_cifar", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_backbones_give_features_of_out_dim(backbone, dim, norm):
    cfg = load_config({"model": {"backbone": backbone, "norm": norm}})
    net = build_backbone(cfg.model, 32)
    assert net.out_dim == dim
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert has_bn == (norm == "batch")


def test_resnet18_cifar_keeps_the_cifar_stem():
    net = build_backbone(load_config({"model": {"backbone": "resnet18_cifar"}}).model, 32)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(UnknownNameError, match="method.name must be one of moco_v2, simclr, simsiam, supervised, supervised_rare, got 'byol'"):
        check_names(load_config({"method": {"name": "byol"}}))
    with pytest.raises(UnknownNameError, match="model.backbone must be one of resnet18_cifar, resnet50, small_cnn"):
        check_names(load_config({"model": {"backbone": "vit"}}))
    with pytest.raises(UnknownNameError):
        build_method(load_config({"method": {"name": "byol"}}), 10)
    assert {"simsiam", "simclr", "moco_v2", "supervised"} <= set(METHODS)
    assert {"small_cnn", "resnet18_cifar", "resnet50"} <= set(BACKBONES)


def test_view_pairs():
    assert view_pairs(2, "all_pairs") == [(0, 1)] == view_pairs(2, "anchor")
    assert view_pairs(4, "all_pairs") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert view_pairs(4, "anchor") == [(0, 1), (0, 2), (0, 3)]


@pytest.mark.parametrize("pairing", ["all_pairs", "anchor"])
def test_forward_averages_pair_losses_over_k_views(pairing):
    torch.manual_seed(0)
    cfg = load_config({"model": {"backbone": "small_cnn", "norm": "group"}, "method": {"name": "simclr", **SMALL, "multiview": {"pairing": pairing}}})
    method = build_method(cfg, 4)
    batch = _batch(views=3)
    loss = method(batch["views"], batch)
    outs = [method.embed(v) for v in batch["views"]]
    expected = torch.stack([method.pair_loss(outs[i], outs[j], batch) for i, j in view_pairs(3, pairing)]).mean(0)
    assert loss.shape == (16,)
    assert torch.allclose(loss, expected, atol=1e-6)


def _nt_xent_reference(za, zb, tau):
    """SimCLR's 2N x 2N formulation, row by row."""
    z = F.normalize(torch.cat([za, zb]), dim=1)
    n = za.shape[0]
    sim = z @ z.T
    losses = []
    for i in range(2 * n):
        t = tau[i % n] if isinstance(tau, torch.Tensor) else tau
        logits = sim[i] / t
        pos = (i + n) % (2 * n)
        others = torch.cat([logits[:i], logits[i + 1:]])
        losses.append(-(logits[pos] - torch.logsumexp(others, 0)))
    losses = torch.stack(losses)
    return 0.5 * (losses[:n] + losses[n:])


def test_nt_xent_matches_the_2n_reference_with_scalar_and_per_sample_temperature():
    gen = torch.Generator().manual_seed(0)
    za, zb = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    assert torch.allclose(nt_xent(za, zb, 0.2), _nt_xent_reference(za, zb, 0.2), atol=1e-5)
    tau = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.2, 0.1])
    assert torch.allclose(nt_xent(za, zb, tau), _nt_xent_reference(za, zb, tau), atol=1e-5)
    assert torch.allclose(nt_xent(za, zb, torch.full((6,), 0.2)), nt_xent(za, zb, 0.2), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(za, zb, torch.ones(5))


def test_info_nce_matches_by_hand_and_takes_per_sample_temperature():
    gen = torch.Generator().manual_seed(1)
    q, k = F.normalize(torch.randn(4, 3, generator=gen), dim=1), F.normalize(torch.randn(4, 3, generator=gen), dim=1)
    queue = F.normalize(torch.randn(7, 3, generator=gen), dim=1)
    tau = torch.tensor([0.1, 0.2, 0.3, 0.4])
    by_hand = torch.stack([-(q[i] @ k[i] / tau[i]) + torch.logsumexp(torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / tau[i], 0)
                           for i in range(4)])
    assert torch.allclose(info_nce(q, k, queue, tau), by_hand, atol=1e-5)



def test_sample_temperature_and_weight_hooks_reach_the_loss():
    torch.manual_seed(0)
    method = build_method(_cfg("simclr", norm="group"), 4)
    batch = _batch()
    base = method(batch["views"], batch).detach()
    method.sample_weight = lambda b: torch.full((16,), 2.0)
    assert torch.allclose(method(batch["views"], batch).detach(), 2 * base, atol=1e-5)
    method.sample_weight = lambda b: None
    method.sample_temperature = lambda b: torch.full((16,), 0.2)
    assert torch.allclose(method(batch["views"], batch).detach(), base, atol=1e-5)
    method.sample_temperature = lambda b: torch.full((16,), 0.05)
    assert not torch.allclose(method(batch["views"], batch).detach(), base, atol=1e-3)


def test_second_pass_does_not_update_bn_statistics():
    torch.manual_seed(0)
    method = build_method(_cfg("simsiam"), 4)
    batch = _batch()
    method(batch["views"], batch)
    stats = {k: v.clone() for k, v in method.state_dict().items() if "running" in k}
    assert stats
    method(batch["views"], batch, update_state=False)
    for k, v in method.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    momenta = {m.momentum for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert momenta == {0.1}  # restored after the pass
    method(batch["views"], batch, update_state=True)
    assert any(not torch.equal(v, stats[k]) for k, v in method.state_dict().items() if "running" in k)
    with frozen_bn_stats(method):
        assert {m.momentum for m in method.modules() if isinstance(m, torch.nn.BatchNorm1d)} == {0.0}


def test_moco_updates_key_encoder_and_queue_once_per_step():
    torch.manual_seed(0)
    method = build_method(_cfg("moco_v2", moco_momentum=0.9), 4)
    batch = _batch()
    key0 = [p.clone() for p in method.key_encoder.parameters()]
    queue0 = method.queue.clone()
    first = method(batch["views"], batch, update_state=True)
    key1 = [p.clone() for p in method.key_encoder.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(key0, key1))  # momentum update happened
    # perturb the query encoder as SAM would; the second pass must not touch key encoder or queue
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(0.1)
    second = method(batch["views"], batch, update_state=False)
    assert all(torch.equal(a, b) for a, b in zip(key1, method.key_encoder.parameters()))
    assert torch.equal(method.queue, queue0) and int(method.queue_ptr) == 0
    assert not torch.allclose(first, second)
    method.end_step()
    assert int(method.queue_ptr) == 16
    assert not torch.equal(method.queue[:16], queue0[:16]) and torch.equal(method.queue[16:], queue0[16:])
    assert torch.allclose(method.queue[:16].norm(dim=1), torch.ones(16))
    method.end_step()  # nothing pending: no second enqueue
    assert int(method.queue_ptr) == 16
    with pytest.raises(RuntimeError, match="update_state=False"):
        build_method(_cfg("moco_v2"), 4)(batch["views"], batch, update_state=False)


def test_moco_queue_wraps_around():
    torch.manual_seed(0)
    method = build_method(_cfg("moco_v2", moco_queue_size=24), 4)
    batch = _batch()
    for _ in range(2):
        method(batch["views"], batch)
        method.end_step()
    assert int(method.queue_ptr) == (2 * 16) % 24


def test_supervised_is_cross_entropy_on_labels_and_takes_one_view():
    torch.manual_seed(0)
    method = build_method(_cfg("supervised"), 4)
    batch = _batch(views=1)
    loss = method(batch["views"], batch)
    logits = method.classifier(method.encoder(batch["views"][0]))
    assert torch.allclose(loss, F.cross_entropy(logits, batch["label"], reduction="none"), atol=1e-5)
    with pytest.raises(ValueError, match="needs at least 2 views"):
        build_method(_cfg("simsiam"), 4)(batch["views"], batch)


@pytest.mark.parametrize("name", ["simsiam", "simclr", "moco_v2", "supervised"])
def test_each_method_loss_decreases_on_a_tiny_dataset(name):
    """30 SGD steps on 32 fixed images with light noise views: the per-sample loss goes down."""
    torch.manual_seed(0)
    method = build_method(_cfg(name, moco_momentum=0.9), 4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 8, 8, generator=gen)
    labels = torch.arange(32) % 4
    images += labels.view(-1, 1, 1, 1).float()  # classes are separable (the supervised baseline)
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        views = [images + 0.1 * torch.randn(images.shape, generator=gen) for _ in range(2)]
        batch = {"views": views, "label": labels, "index": torch.arange(32)}
        loss = method(views, batch)
        assert loss.shape == (32,) and torch.isfinite(loss).all()
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        method.end_step()
        losses.append(loss.mean().item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
