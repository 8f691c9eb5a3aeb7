"""The on-device augmentation: fixed shapes, no host sync, one parameter copy; compiled equals eager equals the old masked ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ltssl.data import DataError
from ltssl.data import augment as A
from ltssl.data import resident as R
from test_data_util import cifar_images

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def images():
    x = torch.from_numpy(cifar_images(40, 21)).permute(0, 3, 1, 2).contiguous()
    x[0] = 128  # grey: hue undefined
    return x


# ----------------------------------------------------------------------------- the previous masked ops, as the reference


def masked_jitter(x, apply, factors, order):
    """The colour jitter as it was: per position and operation, the selected samples gathered, changed, written back."""
    x = x.clone()
    for position in range(4):
        for op in range(4):
            sel = torch.nonzero(apply & (order[:, position] == op)).flatten()
            if sel.numel():
                x.index_copy_(0, sel, A._jitter_op(x.index_select(0, sel), op, factors.index_select(0, sel)[:, op]))
    return x


def masked_blur(x, apply, sigma):
    """The Gaussian blur as it was: only the selected samples convolved."""
    n, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    sel = torch.nonzero(apply).flatten()
    coords = torch.arange(k, dtype=torch.float32) - k // 2
    kern = torch.exp(-(coords[None] ** 2) / (2 * sigma[sel, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    m, pad = len(sel), k // 2
    flat = x.index_select(0, sel).reshape(1, m * c, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kern.repeat_interleave(c, 0).view(m * c, 1, 1, k), groups=m * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kern.repeat_interleave(c, 0).view(m * c, 1, k, 1), groups=m * c)
    out = x.clone()
    out.index_copy_(0, sel, flat.view(m, c, h, w))
    return out


def reference_views(images_uint8, gen, recipe, size, num_views, index):
    x = A.to_float(images_uint8.index_select(0, index))
    out = []
    for _ in range(num_views):
        p = A.draw_view_params(gen, len(index), *x.shape[2:], recipe)
        v = A.resized_crop(x, p.boxes, p.flips, size).clamp_(0, 1)
        v = A.random_grayscale(masked_jitter(v, p.jitter, p.factors, p.order), p.gray)
        if p.blur is not None:
            v = A.random_solarize(masked_blur(v, p.blur, p.sigma), p.solarize)
        out.append(A.normalize(v, MEAN, STD))
    return out


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_fixed_shape_ops_equal_the_masked_ops_exactly(images, recipe):
    r, index = A.get_recipe(recipe), torch.randperm(40, generator=torch.Generator().manual_seed(1))[:23]
    for size in (32, 24):
        got = A.make_views(images, A.generator_for(3, size), r, size, 2, MEAN, STD, index=index, fused=False)
        ref = reference_views(images, A.generator_for(3, size), r, size, 2, index)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


# ----------------------------------------------------------------------------- compiled


def counting(backend: str, calls: list):
    """A torch.compile backend that records every graph it is given, then compiles it with ``backend``."""
    def compile_graph(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return lookup_backend(backend)(gm, example_inputs)
    return compile_graph


def test_compiled_loader_equals_eager_in_one_graph_with_a_padded_last_batch(images):
    """aot_eager (the functionalised aten graph inductor would get) with fullgraph: no graph break, so no
    .item()/.tolist()/nonzero/boolean-mask indexing; one graph for every batch of every epoch."""
    kw = dict(batch_size=16, num_views=2, image_size=32, recipe="imagenet", seed=4, mean=MEAN, std=STD, device="cpu",
              drop_last=False)
    labels = np.arange(40) % 10
    calls: list = []
    compiled = R.ResidentLoader(images, labels, compile=counting("aot_eager", calls), **kw)
    eager = R.ResidentLoader(images, labels, compile=False, fused=False, **kw)
    assert (compiled.pixels, eager.pixels) == ("compiled", "eager") and len(compiled) == 3  # 16 + 16 + 8
    for epoch in (0, 1):
        for a, b in zip(compiled.epoch(epoch), eager.epoch(epoch), strict=True):
            assert torch.equal(a["index"], b["index"]) and [v.shape for v in a["views"]] == [v.shape for v in b["views"]]
            for u, v in zip(a["views"], b["views"]):
                assert torch.allclose(u, v, atol=1e-5), float((u - v).abs().max())
    assert len(calls) == 1 and compiled.compile_error is None


def test_a_failed_compile_falls_back_with_a_warning_or_raises_when_asked_for(images):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    kw = dict(batch_size=8, num_views=2, image_size=32, recipe="cifar", seed=4, mean=MEAN, std=STD, device="cpu")
    eager = next(iter(R.ResidentLoader(images, np.zeros(40), fused=False, compile=False, **kw).epoch(0)))
    auto = A.CompiledPixels(broken, strict=False)
    loader = R.ResidentLoader(images, np.zeros(40), fused=False, compile=False, **kw)
    loader._pixels = auto  # the CUDA default (compile=None) with a backend that fails
    with pytest.warns(RuntimeWarning, match="torch.compile of the augmentation failed, running it eagerly"):
        batch = next(iter(loader.epoch(0)))
    assert all(torch.equal(u, v) for u, v in zip(batch["views"], eager["views"]))
    assert loader.pixels == "eager" and "no compiler here" in loader.compile_error
    with pytest.raises(Exception, match="no compiler here"):
        next(iter(R.ResidentLoader(images, np.zeros(40), compile=broken, **kw).epoch(0)))


def test_loader_options():
    x, y = torch.zeros(8, 3, 8, 8, dtype=torch.uint8), np.zeros(8)
    kw = dict(batch_size=4, num_views=2, image_size=8, recipe="cifar", seed=0, mean=MEAN, std=STD, device="cpu")
    assert R.ResidentLoader(x, y, **kw).pixels == "fused"  # the CPU default: the numba kernel
    assert R.ResidentLoader(x, y, compile=False, **kw).pixels == "fused"
    assert R.ResidentLoader(x, y, fused=False, **kw).pixels == "eager"
    assert R.ResidentLoader(x, y, compile="aot_eager", **kw).pixels == "compiled"
    with pytest.raises(DataError, match="^compile applies to the batched torch augmentation: it needs fused=False$"):
        R.ResidentLoader(x, y, fused=True, compile=True, **kw)


# ----------------------------------------------------------------------------- no host sync


class DeviceTraffic(TorchDispatchMode):
    """Records every op that moves data between the host and a device, or makes a device tensor from host data,
    or reads a device value: (op, source devices, destination device). Host-only ops (the draws) are not recorded."""

    READS = ("lift_fresh", "_local_scalar_dense", "nonzero", "item", "tolist")

    def __init__(self):
        super().__init__()
        self.moves = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        sources = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        devices = sources | {o.device.type for o in outs}
        if devices != {"cpu"} and (len(devices) > 1 or any(r in str(func) for r in self.READS)):
            self.moves.append((str(func), "/".join(sorted(sources)), "/".join(sorted({o.device.type for o in outs}))))
        return out


class HostData(TorchFunctionMode):
    """Records device tensors made from Python data (torch.tensor / as_tensor of a list with a device: a blocking
    copy that happens below dispatch; a tensor argument's copy is DeviceTraffic's)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor)
                and torch.device(kwargs.get("device") or "cpu").type != "cpu"):
            self.made.append((func.__name__, str(kwargs["device"])))
        return func(*args, **kwargs)


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
def test_the_device_path_reads_nothing_back_and_copies_the_parameters_once(recipe):
    """On ``meta`` (a device whose data the host cannot read) the pixel work runs only if it never reads a value
    back (.item, .cpu, nonzero, boolean-mask indexing fail there) and never mixes in a host tensor; the whole
    batch moves host -> device data exactly once: the packed parameters of all views."""
    r = A.get_recipe(recipe)
    images = torch.empty(40, 3, 32, 32, dtype=torch.uint8, device="meta")
    index = torch.empty(16, dtype=torch.int64, device="meta")
    A.make_views(images, A.generator_for(1), r, 32, 2, MEAN, STD, index=index, fused=False)  # channel stats made once
    with DeviceTraffic() as traffic, HostData() as host_data:
        views = A.make_views(images, A.generator_for(2), r, 32, 2, MEAN, STD, index=index, fused=False)
        padded = A.make_views(images, A.generator_for(3), r, 24, 2, MEAN, STD, index=index[:5], fused=False, rows=16)
    assert [v.shape for v in views + padded] == [(16, 3, 32, 32)] * 2 + [(5, 3, 24, 24)] * 2
    assert all(v.device.type == "meta" for v in views + padded)
    assert traffic.moves == [("aten._to_copy.default", "cpu", "meta")] * 2, traffic.moves
    assert host_data.made == []
