"""bf16 autocast, channels_last and torch.compile exercised on the CPU through the trainer's own builders.

Every method x optimizer (SGD, SAM, rwSAM with label_power and kde weights) takes one step of a
small model under ``train.amp: true`` + ``train.channels_last: true`` on the CPU: the loss is
finite and close to the fp32 step's, the update is close to the fp32 update, and parameters,
optimizer state and rwSAM weights stay fp32. A compiled step equals the eager one.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import ltssl.train as train_module
from ltssl.config import ConfigError, load_config
from ltssl.eval import extract_features
from ltssl.train import build_model, build_optimizer_and_weights, build_runtime, train_step

METHODS = ["simsiam", "simclr", "moco_v2", "supervised"]
OPTIMIZERS = {
    "sgd": {"optim.name": "sgd"},
    "sam": {"optim.name": "sam"},
    "rwsam_label_power": {"optim.name": "rwsam", "optim.weighting": "label_power"},
    "rwsam_kde": {"optim.name": "rwsam", "optim.weighting": "kde"},
}
NUM_CLASSES, N_TRAIN, BATCH, SIZE = 4, 64, 16, 16
CLASS_COUNTS = [32, 16, 10, 6]  # sums to N_TRAIN
DATA = types.SimpleNamespace(class_counts=CLASS_COUNTS, n_train=N_TRAIN, num_classes=NUM_CLASSES, image_size=SIZE)


def _cfg(method: str, optim: str, *, amp: bool, channels_last: bool, compile: bool = False):
    return load_config({"model": {"backbone": "small_cnn", "norm": "batch"}, "data": {"image_size": SIZE},
                        "method": {"name": method, "proj_dim": 32, "proj_hidden_dim": 32, "pred_hidden_dim": 16,
                                   "moco_queue_size": 64},
                        "optim": {"lr": 0.05, "rho": 0.5, "adaptive": True},
                        "train": {"device": "cpu", "batch_size": BATCH, "amp": amp, "channels_last": channels_last,
                                  "compile": compile}},
                       OPTIMIZERS[optim])


def _batch():
    gen = torch.Generator().manual_seed(1)
    return {"views": [torch.rand(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2)],
            "label": torch.arange(BATCH) % NUM_CLASSES, "index": torch.randperm(N_TRAIN, generator=gen)[:BATCH]}


def _step(cfg):
    """One step as the trainer takes it; returns (loss, method, optimizer, weights, the batch weights)."""
    rt = build_runtime(cfg)
    method, model = build_model(cfg, rt, SIZE, NUM_CLASSES)
    optimizer, weights = build_optimizer_and_weights(cfg, method, DATA, rt.device)
    if weights.scheme == "kde":  # as after a refresh: per-sample weights, mean 1
        w = torch.linspace(0.5, 1.5, N_TRAIN)
        weights.set_kde(w / w.mean(), epoch=0)
    batch = _batch()
    if rt.channels_last:  # as run_epochs does
        batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
    batch_weights = weights.batch_weights(batch) if cfg.optim.name == "rwsam" else None
    loss = train_step(model, optimizer, batch, batch_weights, autocast=rt.autocast)
    return loss, method, optimizer, weights, batch_weights, rt


def _update(method, initial):
    return torch.cat([(p.detach() - initial[name]).flatten() for name, p in method.named_parameters()])


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS)
def test_bf16_channels_last_step_is_finite_close_to_fp32_and_keeps_fp32_state(method, optim):
    fp32 = _cfg(method, optim, amp=False, channels_last=False)
    initial = build_model(fp32, build_runtime(fp32), SIZE, NUM_CLASSES)[0].state_dict()  # seeded: every build starts here
    ref_loss, ref_method, *_ = _step(fp32)
    loss, bf16_method, optimizer, weights, batch_weights, rt = _step(_cfg(method, optim, amp=True, channels_last=True))

    assert rt.amp and rt.channels_last and rt.device.type == "cpu"  # applied on the CPU, not silently dropped
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert abs(float(loss) - float(ref_loss)) <= 0.02 * max(1.0, abs(float(ref_loss)))
    # the update points the same way; its length is not compared: bf16 keeps 8 bits of mantissa, and on a
    # fresh small model with BatchNorm over 16 samples that moves the update by a sizeable fraction of it
    ref_update, update = _update(ref_method, initial), _update(bf16_method, initial)
    assert float(ref_update.norm()) > 0
    assert float(F.cosine_similarity(update, ref_update, dim=0)) > 0.8

    for name, p in bf16_method.named_parameters():
        assert p.dtype == torch.float32, name
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name
    for name, buf in bf16_method.named_buffers():
        assert not buf.is_floating_point() or buf.dtype == torch.float32, name
    state = optimizer.state_dict()
    base = state["base"] if "base" in state else state
    assert all(t.dtype == torch.float32 for s in base["state"].values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point())
    if optim.startswith("rwsam"):
        assert batch_weights.dtype == torch.float32
        table = weights.per_class if weights.scheme == "label_power" else weights.per_sample
        assert table.dtype == torch.float32


def test_compiled_step_equals_the_eager_step():
    """One compiled rwSAM step (both forward passes of the SAM step go through the compiled model)."""
    torch.manual_seed(0)
    eager_loss, eager, *_ = _step(_cfg("simsiam", "rwsam_label_power", amp=False, channels_last=False))
    torch.manual_seed(0)
    compiled_loss, compiled, *_ = _step(_cfg("simsiam", "rwsam_label_power", amp=False, channels_last=False, compile=True))
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
        else:
            assert torch.equal(a, b), name


def test_cuda_device_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(train_module.torch.cuda, "is_available", lambda: False)
    cfg = load_config({"train": {"device": "cuda"}})
    with pytest.raises(ConfigError, match=r"^train\.device is cuda but no CUDA device is available$"):
        build_runtime(cfg)


def test_precision_settings_default_to_cuda_only():
    rt = build_runtime(load_config({"train": {"device": "cpu"}}))
    assert (rt.amp, rt.channels_last) == (False, False)
    rt = build_runtime(load_config({"train": {"device": "cpu", "amp": True, "channels_last": False}}))
    assert (rt.amp, rt.channels_last) == (True, False)


def test_feature_pass_runs_in_bf16_on_the_cpu_and_returns_fp32_features():
    cfg = _cfg("simsiam", "sgd", amp=True, channels_last=True)
    rt = build_runtime(cfg)
    method, _ = build_model(cfg, rt, SIZE, NUM_CLASSES)
    images = torch.rand(2 * BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    batches = [{"image": images[i:i + BATCH], "label": torch.zeros(BATCH, dtype=torch.long), "index": torch.arange(i, i + BATCH)}
               for i in range(0, 2 * BATCH, BATCH)]
    seen = []
    hook = method.encoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    bf16, _ = extract_features(method.encoder, batches, rt.device, amp=rt.amp, channels_last=rt.channels_last)
    hook.remove()
    fp32, _ = extract_features(method.encoder, batches, rt.device)
    assert seen == [torch.bfloat16, torch.bfloat16]  # autocast was on for the CPU pass
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert float(F.cosine_similarity(bf16, fp32, dim=1).min()) > 0.99


def test_a_slurm_task_uses_as_many_torch_threads_as_its_cpus(monkeypatch):
    """Under Slurm torch would start a thread per core of the node: the task's CPUs decide, unless
    OMP_NUM_THREADS says otherwise (a local sweep sets it for its jobs)."""
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        torch.set_num_threads(2)
        build_runtime(load_config({"train": {"device": "cpu"}}))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        build_runtime(load_config({"train": {"device": "cpu"}}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
