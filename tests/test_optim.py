"""SAM against a hand computation, rwSAM's two gradients, the weighting schemes, the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltssl.config import load_config
from ltssl.optim import SAM, build_optimizer, learning_rate
from ltssl.optim.weights import SampleWeights, class_ranks, kde_log_density, kde_weights, label_power_weights
from ltssl.train import train_step


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(model, x, y):
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_steps_match_hand_computation(adaptive):
    rho, lr = 0.3, 0.1
    model = _tiny_model()
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)

    _loss(model, x, y).backward()
    g0 = [p.grad.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    # hand computation: e_w = rho T(w)^2 g / ||T(w) g||, the norm over all parameters together
    t = [w.abs() if adaptive else torch.ones_like(w) for w in w0]
    norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g0)))
    perturbed = [w + rho * ti**2 * gi / (norm + 1e-12) for w, ti, gi in zip(w0, t, g0)]
    for p, expected in zip(model.parameters(), perturbed):
        assert torch.allclose(p, expected, atol=1e-7)
        assert p.grad is None
    # the perturbation has length rho in the T-scaled metric: ||T^-1 e|| = rho
    scaled_len = math.sqrt(sum(float((((pe - w) / ti) ** 2).sum()) for pe, w, ti in zip(perturbed, w0, t)))
    assert scaled_len == pytest.approx(rho, rel=1e-5)

    _loss(model, x, y).backward()
    g1 = [p.grad.detach().clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    for p, w, g in zip(model.parameters(), w0, g1):
        assert torch.allclose(p, w - lr * g, atol=1e-7)  # restored w, base SGD step with the perturbed gradient


def test_sam_state_dict_round_trip_holds_base_optimizer_state():
    model = _tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for _ in range(2):
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
    state = opt.state_dict()
    assert len(state["base"]["state"]) == 4  # a momentum buffer per parameter
    fresh = SAM(_tiny_model().parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["rho"] == 0.1
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    for a, b in zip(opt.base_optimizer.state.values(), fresh.base_optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_sam_rho_zero_is_the_base_optimizer():
    a, b = _tiny_model(), _tiny_model()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1)
    _loss(a, x, y).backward()
    sam.first_step(zero_grad=True)
    _loss(a, x, y).backward()
    sam.second_step()
    _loss(b, x, y).backward()
    sgd.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q)


class _PerSample(nn.Module):
    """A 'method': per-sample squared error of a linear model; records the BN-free passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.passes = []

    def forward(self, views, batch, update_state=True):
        self.passes.append(update_state)
        return (self.lin(views[0]).squeeze(1) - batch["target"]) ** 2

    def end_step(self):
        pass


def _rwsam_expected(weights, x, target, rho, lr, update_weights=None):
    """w1 from a hand-written rwSAM step: ascent from the weighted loss, update from the unweighted one
    (or from the ``update_weights``-weighted one, to show that it would differ)."""
    ref = _PerSample()
    params = list(ref.parameters())
    w0 = [p.detach().clone() for p in params]
    per = ref([x], {"target": target})
    ((weights * per).sum() / weights.sum()).backward()
    g = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / (norm + 1e-12))
            p.grad = None
    per = ref([x], {"target": target})
    (per.mean() if update_weights is None else (update_weights * per).sum() / update_weights.sum()).backward()
    return [(w - lr * p.grad).detach() for w, p in zip(w0, params)]


def test_rwsam_ascent_uses_weighted_loss_and_update_uses_unweighted_loss():
    rho, lr = 0.5, 0.2
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(6, 3, generator=gen), torch.randn(6, generator=gen)
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 20.0])
    batch = {"views": [x], "target": target}

    model = _PerSample()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=False, lr=lr)
    loss = train_step(model, opt, batch, weights)
    assert model.passes == [True, False]  # the second (perturbed) pass does not update state
    assert loss.item() == pytest.approx(_PerSample()([x], {"target": target}).mean().item())
    for p, e in zip(model.parameters(), _rwsam_expected(weights, x, target, rho, lr)):
        assert torch.allclose(p, e, atol=1e-6)

    # the weights matter (only through the perturbation), and weights of 1 give plain SAM
    sam_model = _PerSample()
    train_step(sam_model, SAM(sam_model.parameters(), torch.optim.SGD, rho=rho, lr=lr), batch, None)
    ones = _rwsam_expected(torch.ones(6), x, target, rho, lr)
    for p, e, q in zip(sam_model.parameters(), ones, model.parameters()):
        assert torch.allclose(p, e, atol=1e-6)
        assert not torch.allclose(p, q, atol=1e-4)
    # the update gradient is the unweighted one: a weighted update would land elsewhere
    weighted_update = _rwsam_expected(weights, x, target, rho, lr, update_weights=weights)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(weighted_update, model.parameters()))


def test_label_power_weights_follow_class_rank_by_count():
    counts = [50, 500, 5, 200]  # ranks: class 1 -> 0, class 3 -> 1, class 0 -> 2, class 2 -> 3
    assert class_ranks(counts).tolist() == [2, 0, 3, 1]
    w = label_power_weights(counts, 1.2)
    raw = torch.tensor([1.2**2, 1.0, 1.2**3, 1.2])
    assert torch.allclose(w / w[1], raw)
    per_sample = w.repeat_interleave(torch.tensor(counts))
    assert per_sample.mean().item() == pytest.approx(1.0, rel=1e-6)
    sw = SampleWeights("label_power", counts, sum(counts), "cpu", 1.2)
    assert torch.allclose(sw.batch_weights({"label": torch.tensor([2, 1]), "index": torch.tensor([0, 1])}), w[[2, 1]])
    assert sw.stats()["weight_mean"] == pytest.approx(1.0, rel=1e-6)


def _clustered_features(seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = F.normalize(torch.tensor([1.0, 0, 0, 0]) + 0.05 * torch.randn(200, 4, generator=gen), dim=1)
    medium = F.normalize(torch.tensor([0, 1.0, 0, 0]) + 0.05 * torch.randn(20, 4, generator=gen), dim=1)
    isolated = F.normalize(torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 1.0]]), dim=1)
    return torch.cat([dense, medium, isolated])


def test_kde_weights_larger_for_isolated_points_mean_one_and_ones_at_alpha_zero():
    f = _clustered_features()
    w = kde_weights(f, bandwidth=0.3, alpha=1.0)
    assert w.shape == (222,)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert w[220:].min() > w[200:220].max() > w[:200].max()
    assert torch.equal(kde_weights(f, 0.3, 0.0), torch.ones(222))
    # a larger alpha sharpens the contrast
    w2 = kde_weights(f, 0.3, 2.0)
    assert (w2[220] / w2[0]) > (w[220] / w[0])
    # chunked density = one-shot density
    full = kde_log_density(f, 0.3)
    chunked = kde_log_density(f, 0.3, chunk_elements=222 * 7)
    assert torch.allclose(full, chunked, atol=1e-6)
    # by hand for one point: log mean_j exp((f_i.f_j - 1)/h^2)
    i = 5
    by_hand = torch.log(torch.exp((f @ f[i] - 1) / 0.09).mean())
    assert full[i].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_kde_sample_weights_are_looked_up_by_index_and_survive_a_state_round_trip():
    sw = SampleWeights("kde", [3, 2], 5, "cpu")
    assert torch.equal(sw.batch_weights({"index": torch.tensor([4, 0]), "label": torch.tensor([1, 0])}), torch.ones(2))
    sw.set_kde(torch.tensor([0.5, 0.5, 1.0, 1.0, 2.0]), epoch=3)
    assert sw.batch_weights({"index": torch.tensor([4, 0]), "label": torch.tensor([0, 0])}).tolist() == [2.0, 0.5]
    other = SampleWeights("kde", [3, 2], 5, "cpu")
    other.load_state_dict(sw.state_dict())
    assert other.kde_epoch == 3 and torch.equal(other.per_sample, sw.per_sample)
    assert SampleWeights("none", [3, 2], 5, "cpu").batch_weights({"index": torch.tensor([0])}) is None
    with pytest.raises(ValueError, match="shape"):
        sw.set_kde(torch.ones(4), epoch=0)


def test_build_optimizer_and_learning_rate_schedule():
    model = _tiny_model()
    assert isinstance(build_optimizer(load_config({"optim": {"name": "sgd"}}).optim, model), torch.optim.SGD)
    sam = build_optimizer(load_config({"optim": {"name": "rwsam", "rho": 2.0, "adaptive": True}}).optim, model)
    assert isinstance(sam, SAM) and sam.param_groups[0]["rho"] == 2.0 and sam.param_groups[0]["adaptive"]
    cfg = load_config({"optim": {"lr": 0.1, "warmup_epochs": 1}}).optim
    assert learning_rate(cfg, 0, 10, 5) == pytest.approx(0.01)
    assert learning_rate(cfg, 9, 10, 5) == pytest.approx(0.1)
    assert learning_rate(cfg, 10, 10, 5) == pytest.approx(0.1)
    assert learning_rate(cfg, 30, 10, 5) == pytest.approx(0.05)
    assert learning_rate(cfg, 50, 10, 5) == pytest.approx(0.0, abs=1e-12)
    const = load_config({"optim": {"lr": 0.1, "schedule": "constant"}}).optim
    assert learning_rate(const, 37, 10, 5) == 0.1


@pytest.mark.parametrize("name", ["sgd", "rwsam"])
def test_step_keeps_gradient_and_sam_buffers_between_steps(name):
    """No per-step allocation of gradients or of SAM's w / e_w: the same storage serves every step."""
    model = _PerSample()
    opt = build_optimizer(load_config({"optim": {"name": name, "rho": 0.5, "adaptive": True}}).optim, model)
    gen = torch.Generator().manual_seed(4)
    batch = {"views": [torch.randn(6, 3, generator=gen)], "target": torch.randn(6, generator=gen)}
    storage = []
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, opt, batch, torch.rand(6, generator=gen) + 0.5 if name == "rwsam" else None)
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the step moved every parameter
        buffers = [p.grad.data_ptr() for p in model.parameters()]
        if name == "rwsam":
            buffers += [opt._saved[p].data_ptr() for p in model.parameters()] + [opt._work[p].data_ptr() for p in model.parameters()]
        storage.append(buffers)
    assert storage[0] == storage[1] == storage[2]
