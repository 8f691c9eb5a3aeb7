"""SSL view augmentation on batched tensors, with per-sample parameters from an explicit generator.

The recipes are those of SimSiam / MoCo v2 as used by Liu et al. (ICLR 2022):

- ``cifar``: RandomResizedCrop(S, scale 0.2-1, ratio 3/4-4/3), horizontal flip p 0.5,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, normalisation.
- ``imagenet``: the same plus Gaussian blur (sigma 0.1-2, kernel ~10 % of S) with p 0.5 (MoCo v2)
  and solarisation (threshold 0.5) with p 0.2 (BYOL's second-view value, here on every view).

Every random parameter is drawn on the CPU from the ``torch.Generator`` passed in (so the same
generator state gives the same views on CPU and GPU, and nothing reads torch's global RNG); the
pixel work runs on the CPU in one compiled kernel per sample (:mod:`ltssl.data.fused`, the same
operations), or batched on the images' device (:func:`device_views`): all views' parameters go
there in one copy, and the pixel ops (:func:`view_pixels`) have fixed shapes and never read a
value back (per-sample choices are ``torch.where`` blends), so a GPU never waits for the host
and ``torch.compile`` turns them into one graph (:class:`CompiledPixels`). The operations follow torchvision's definitions
(``RandomResizedCrop.get_params``, antialiased bilinear ``resized_crop``,
``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``, colour-jitter operations in
a random order per sample), with one deliberate difference: a non-square source (the
semi-synthetic 2:1 images) draws aspect ratios relative to its own aspect, so that scale 1 is
the whole image.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

log = logging.getLogger(__name__)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Recipe:
    name: str
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


RECIPES = {
    "cifar": Recipe("cifar"),
    "imagenet": Recipe("imagenet", blur_p=0.5, solarize_p=0.2),
}


def get_recipe(name: "str | Recipe") -> Recipe:
    """A recipe by name (``cifar``, ``imagenet``), or a :class:`Recipe` given as is."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise DataError(f"augmentation recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]


def seed_for(*keys: int) -> int:
    """A 63-bit seed mixing ``keys`` (e.g. seed, epoch, step, rank) through numpy's SeedSequence."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator_for(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from ``keys``."""
    gen = torch.Generator()
    gen.manual_seed(seed_for(*keys))
    return gen


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) * (high - low) + low


def _np(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (a numpy ufunc) of a small CPU tensor: torch runs exp/sqrt on a few thousand elements on
    every intra-op thread, and the waiting threads cost far more CPU time than the work itself."""
    return torch.from_numpy(fn(x.numpy()))


def crop_boxes(gen: torch.Generator, n: int, height: int, width: int, scale, ratio) -> torch.Tensor:
    """Per-sample crop boxes (top, left, h, w) as torchvision's RandomResizedCrop.get_params draws them.

    Ten trials per sample, the first that fits is kept, else the central fallback. The ratio range
    is relative to the image's own aspect (identical to torchvision for square images).
    Returns float64 [n, 4].
    """
    area = height * width
    aspect = width / height
    log_lo, log_hi = math.log(ratio[0] * aspect), math.log(ratio[1] * aspect)
    trials = 10
    target = area * _uniform(gen, n * trials, scale[0], scale[1]).view(n, trials)
    ar = _np(np.exp, _uniform(gen, n * trials, log_lo, log_hi)).view(n, trials)
    w = torch.round(_np(np.sqrt, target * ar))
    h = torch.round(_np(np.sqrt, target / ar))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # central fallback, torchvision's rule
    in_ratio = width / height
    if in_ratio < ratio[0] * aspect:
        fw, fh = width, round(width / (ratio[0] * aspect))
    elif in_ratio > ratio[1] * aspect:
        fw, fh = round(height * ratio[1] * aspect), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, w[rows, pick], torch.full((n,), float(fw), dtype=torch.float64))
    ch = torch.where(first >= 0, h[rows, pick], torch.full((n,), float(fh), dtype=torch.float64))
    u_top, u_left = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    top = torch.floor(u_top * (height - ch + 1))
    left = torch.floor(u_left * (width - cw + 1))
    top = torch.where(first >= 0, top, torch.floor((height - ch) / 2))
    left = torch.where(first >= 0, left, torch.floor((width - cw) / 2))
    return torch.stack([top, left, ch, cw], 1)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Per-sample 1-D resampling matrices [B, out_size, in_size] of the crop [start, start + length).

    The triangle (bilinear) filter with antialiasing, as PIL and ``torchvision``'s
    ``resized_crop(..., antialias=True)``: support ``max(scale, 1)`` input pixels around each output
    centre, weights renormalised over the pixels inside the crop (edge pixels are replicated).
    """
    scale = (length / out_size).view(-1, 1, 1)
    support = scale.clamp(min=1.0)
    centre = start.view(-1, 1, 1) + (torch.arange(out_size, dtype=start.dtype, device=start.device).view(1, -1, 1) + 0.5) * scale
    pos = torch.arange(in_size, dtype=start.dtype, device=start.device).view(1, 1, -1) + 0.5
    w = (1.0 - (pos - centre).abs() / support).clamp_(min=0.0)
    inside = (pos >= start.view(-1, 1, 1)) & (pos <= (start + length).view(-1, 1, 1))
    w = w * inside
    # an output centre beyond the last inside pixel centre keeps that pixel (edge replication)
    total = w.sum(-1, keepdim=True)
    return w / total.clamp(min=1e-12)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, flip it horizontally where ``flips``, resize to size x size.

    images: float [B,3,H,W]; boxes: [B,4] (top, left, h, w) in pixels; flips: bool or 0/1 float [B]
    (parameters on the images' device, else copied there). Separable antialiased bilinear
    resampling as two batched matrix products, ``out = R_y @ image @ R_x^T`` with per-sample [S,H]
    and [S,W] weight matrices built on the device (the flip reverses R_x's rows): one matmul pair
    per batch, and the same filter as torchvision's antialiased resize.
    """
    _, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    top, left, ch, cw = boxes.unbind(1)
    ry = _resize_weights(top, ch, height, size)
    rx = _resize_weights(left, cw, width, size)
    rx = torch.where(_mask(flips, images).view(-1, 1, 1), rx.flip(1), rx)
    ry = ry.to(images.dtype)                       # [B,S,H]
    rxt = rx.transpose(1, 2).to(images.dtype)      # [B,W,S]
    b = images.shape[0]
    # channels side by side, so each product is one bmm over the batch: [B,H,3W] -> [B,S,3W] -> [B,3S,S]
    rows = torch.bmm(ry, images.permute(0, 2, 1, 3).reshape(b, height, 3 * width))
    out = torch.bmm(rows.view(b, size * 3, width), rxt)
    return out.view(b, size, 3, size).permute(0, 2, 1, 3).contiguous()


def _mask(apply: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample switch (bool, or 0/1 float as packed by :func:`pack_params`) as bool on x's device."""
    return apply.to(x.device) != 0


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n,3,H,W] -> [n,1,H,W] luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp_(0, 1)


_HSV_OFFSETS = (5.0, 3.0, 1.0)  # R, G, B phases of the HSV -> RGB formula


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, [n,1,1,1]): torchvision's ``adjust_hue``, cheaper.

    RGB -> HSV as torchvision computes it, then HSV -> RGB by the closed form
    ``f(n) = V - V S clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 H) mod 6`` with n = 5, 3, 1 for R, G, B
    (identical values; no [n,3,6,H,W] stack). x: float [n,3,H,W] in [0,1].
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = 1.0 / torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0 + shift[:, 0], 1.0)  # chroma 0: hue is irrelevant (S = 0)
    # python-scalar offsets: a tensor built here would be a blocking host->device copy on every call
    k = torch.stack([torch.remainder(n + 6.0 * hue, 6.0) for n in _HSV_OFFSETS], 1)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


def draw_jitter(gen: torch.Generator, n: int, strengths, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ColorJitter(b, c, s, h) parameters with probability p: (apply bool [n], factors float32 [n,4], order int64 [n,4]).

    Factors: brightness/contrast/saturation ~ U[1-s, 1+s], hue ~ U[-h, h]; order: a uniform
    permutation of the four operations per sample (torchvision's random order).
    """
    bri, con, sat, hue = strengths
    apply = torch.rand(n, generator=gen) < p
    factors = torch.stack(
        [
            _uniform(gen, n, max(0.0, 1 - bri), 1 + bri),
            _uniform(gen, n, max(0.0, 1 - con), 1 + con),
            _uniform(gen, n, max(0.0, 1 - sat), 1 + sat),
            _uniform(gen, n, -hue, hue),
        ],
        1,
    ).to(torch.float32)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    return apply, factors, order


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter on the samples where ``apply``, each with its factors and operation order.

    x: float [B,3,H,W] in [0,1]; apply: bool or 0/1 float [B]; factors: float [B,4]; order: [B,4]
    operation indices (int, or integer-valued float); from :func:`draw_jitter`, on x's device or
    copied there. Fixed shapes: at each of the four positions every operation runs on the whole
    batch and ``torch.where`` keeps each sample's own, so there is no data-dependent shape and no
    host sync (one graph under torch.compile); a sample's values are those of its operations
    applied in its order, as torchvision computes them.
    """
    factors = factors.to(x.device, x.dtype)
    order = order.to(x.device)
    # four times the arithmetic of gathering each operation's samples, but on a GPU that is nothing next
    # to the 16 host syncs (nonzero) the gathers cost; the CPU default is the fused kernel anyway
    out = x
    for position in range(4):
        op_here = order[:, position].view(-1, 1, 1, 1)
        step = out
        for op in range(4):
            step = torch.where(op_here == op, _jitter_op(out, op, factors[:, op]), step)
        out = step
    return torch.where(_mask(apply, x).view(-1, 1, 1, 1), out, x)


def _jitter_op(part: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """Jitter operation ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factors f [n]."""
    f = f.view(-1, 1, 1, 1)
    if op == 0:
        return (part * f).clamp_(0, 1)
    if op == 1:
        return _blend(part, grayscale(part).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:
        return _blend(part, grayscale(part), f)
    return adjust_hue(part, f)


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Grayscale (3 equal channels) where ``apply`` (bool [B])."""
    return torch.where(_mask(apply, x).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur where ``apply`` (bool or 0/1 float [B]) with per-sample ``sigma`` (float [B], pixels); kernel ~10 % of the side, odd.

    Every sample is blurred (one grouped convolution per axis, reflect padding) and ``torch.where``
    keeps the blurred ones: fixed shapes, no host sync.
    """
    n, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    coords = torch.arange(k, dtype=torch.float32, device=x.device) - k // 2
    sigma = sigma.to(x.device, torch.float32)
    kern = torch.exp(-(coords[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).to(x.dtype)  # [n,k]
    flat = x.reshape(1, n * c, h, w)
    kx = kern.repeat_interleave(c, 0).view(n * c, 1, 1, k)
    ky = kern.repeat_interleave(c, 0).view(n * c, 1, k, 1)
    pad = k // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kx, groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), ky, groups=n * c)
    return torch.where(_mask(apply, x).view(-1, 1, 1, 1), flat.view(n, c, h, w), x)


def random_solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Solarisation (1 - x above ``threshold``) where ``apply`` (bool [B])."""
    return torch.where(_mask(apply, x).view(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; mean, std: sequences or [C] tensors (on x's device: no copy)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (any memory format) -> float32 in [0,1], contiguous."""
    return images.to(torch.float32).div_(255.0).contiguous()


@dataclass
class ViewParams:
    """Every random parameter of one view of B images (None where the recipe skips the step).

    As drawn: CPU tensors of the dtypes below. As packed for a device (:func:`pack_params`): float32
    columns of one device tensor (switches 0/1, operation indices integer-valued), the values unchanged.
    """

    boxes: torch.Tensor                    # float64 [B,4]: crop top, left, height, width (pixels)
    flips: torch.Tensor                    # bool [B]
    jitter: torch.Tensor | None = None     # bool [B]: colour jitter applied
    factors: torch.Tensor | None = None    # float32 [B,4]: brightness, contrast, saturation, hue
    order: torch.Tensor | None = None      # int64 [B,4]: jitter operations in the sample's order
    gray: torch.Tensor | None = None       # bool [B]
    blur: torch.Tensor | None = None       # bool [B]
    sigma: torch.Tensor | None = None      # float32 [B]: blur sigma (pixels)
    solarize: torch.Tensor | None = None   # bool [B]


# ViewParams fields and their widths, in the packed column order
_COLUMNS = (("boxes", 4), ("flips", 1), ("jitter", 1), ("factors", 4), ("order", 4), ("gray", 1), ("blur", 1),
            ("sigma", 1), ("solarize", 1))


def draw_view_params(gen: torch.Generator, b: int, height: int, width: int, recipe: Recipe) -> ViewParams:
    """The parameters of one view, drawn from ``gen`` in a fixed order (crop, flip, jitter, gray, blur, solarize)."""
    params = ViewParams(crop_boxes(gen, b, height, width, recipe.crop_scale, recipe.crop_ratio),
                        torch.rand(b, generator=gen) < recipe.flip_p)
    if recipe.jitter_p > 0:
        params.jitter, params.factors, params.order = draw_jitter(gen, b, recipe.jitter, recipe.jitter_p)
    if recipe.gray_p > 0:
        params.gray = torch.rand(b, generator=gen) < recipe.gray_p
    if recipe.blur_p > 0:
        params.blur = torch.rand(b, generator=gen) < recipe.blur_p
        params.sigma = _uniform(gen, b, *recipe.blur_sigma).to(torch.float32)
    if recipe.solarize_p > 0:
        params.solarize = torch.rand(b, generator=gen) < recipe.solarize_p
    return params


def draw_params(gen: torch.Generator, b: int, height: int, width: int, recipe: Recipe, num_views: int) -> list[ViewParams]:
    """Every view's parameters, view after view, from ``gen`` (on one intra-op thread: see below)."""
    threads = torch.get_num_threads()
    # The draws are a few dozen small torch ops; on several intra-op threads each one wakes the idle
    # threads, whose spin-waiting costs many times the work.
    torch.set_num_threads(1)
    try:
        return [draw_view_params(gen, b, height, width, recipe) for _ in range(num_views)]
    finally:
        torch.set_num_threads(threads)


def pack_params(params: list[ViewParams], device, rows: int | None = None) -> tuple[torch.Tensor, tuple]:
    """All views' parameters in one float32 tensor ``[V*rows, P]`` on ``device``, moved by one copy.

    Returns (packed, layout): view v's sample i is row ``v*rows + i``; layout names the columns
    (static: it depends on the recipe only) for :func:`unpack_params`. rows >= B pads every view
    with zero rows (a fixed shape for a compiled caller; their outputs are discarded). Every value
    is exact in float32 (crop boxes are whole pixels; the pixel work used float32 boxes already).
    On CUDA the buffer is pinned and the copy non-blocking: the host does not wait for the device.
    """
    layout = tuple((name, width) for name, width in _COLUMNS if getattr(params[0], name) is not None)
    b = len(params[0].flips)
    rows = b if rows is None else rows
    cuda = torch.device(device).type == "cuda"
    buf = torch.zeros(len(params), rows, sum(w for _, w in layout), dtype=torch.float32, pin_memory=cuda)
    col = 0
    for name, width in layout:
        for v, p in enumerate(params):
            buf[v, :b, col:col + width] = getattr(p, name).view(b, width)
        col += width
    return buf.view(len(params) * rows, -1).to(device, non_blocking=cuda), layout


def unpack_params(packed: torch.Tensor, layout: tuple) -> ViewParams:
    """The :class:`ViewParams` of :func:`pack_params`'s columns (views into ``packed``, [V*rows] rows)."""
    fields, col = {}, 0
    for name, width in layout:
        fields[name] = packed[:, col:col + width] if width > 1 else packed[:, col]
        col += width
    return ViewParams(**fields)


def apply_view(images01: torch.Tensor, params: ViewParams, size: int) -> torch.Tensor:
    """One view of float [B,3,H,W] in [0,1] -> float [B,3,size,size] in [0,1], not normalised (fixed shapes, no host sync
    when ``params`` are on the images' device)."""
    x = resized_crop(images01, params.boxes, params.flips, size).clamp_(0, 1)
    if params.jitter is not None:
        x = color_jitter(x, params.jitter, params.factors, params.order)
    if params.gray is not None:
        x = random_grayscale(x, params.gray)
    return _blur_solarize(x, params)


def _blur_solarize(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    if params.blur is not None:
        x = gaussian_blur(x, params.blur, params.sigma)
    if params.solarize is not None:
        x = random_solarize(x, params.solarize)
    return x


def view_pixels(images_uint8: torch.Tensor, index: torch.Tensor | None, packed: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor, layout: tuple, size: int, num_views: int) -> torch.Tensor:
    """The pixel work of ``num_views`` views, all on the images' device: gather, crop, colour, normalise.

    images_uint8: [N,3,H,W]; index: int64 [R] (None: all N); packed: float32 [num_views*R, P] from
    :func:`pack_params`; mean, std: float32 [3] on the device. Returns normalised float32
    [num_views, R, 3, size, size]. No host sync and no data-dependent shape: the function that
    ``torch.compile`` fuses (one graph, ``fullgraph=True``).
    """
    x = to_float(images_uint8 if index is None else images_uint8.index_select(0, index))
    if num_views > 1:  # every view of a sample crops the same image: the views side by side in one batch
        x = x.repeat(num_views, 1, 1, 1)
    out = normalize(apply_view(x, unpack_params(packed, layout), size), mean, std)
    return out.view(num_views, -1, *out.shape[1:])


@functools.lru_cache(maxsize=16)
def _channel_stats(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """mean, std as float32 [3] on ``device``, made once (a copy per batch would wait for the device)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device), torch.tensor(std, dtype=torch.float32, device=device))


def device_views(images_uint8: torch.Tensor, params: list[ViewParams], size: int, mean, std, *,
                 index: torch.Tensor | None = None, pixels=view_pixels, rows: int | None = None) -> list[torch.Tensor]:
    """One view per entry of ``params`` (drawn on the CPU) of ``images_uint8[index]``, computed on the images' device.

    One host->device copy of the parameters, then ``pixels`` (:func:`view_pixels`, or a compiled
    version of it). rows: pad the batch to this many samples (a compiled ``pixels`` keeps one shape
    for the smaller last batch of an epoch). Returns len(params) float32 [B,3,size,size].
    """
    device = images_uint8.device
    b = len(params[0].flips)
    rows = b if rows is None else max(rows, b)
    packed, layout = pack_params(params, device, rows)
    if index is not None and rows > b:
        index = torch.cat([index, index.new_zeros(rows - b)])  # any valid row: its output is dropped
    if index is None and rows > b:
        raise DataError("padding a batch needs its index")
    m, s = _channel_stats(device, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    out = pixels(images_uint8, index, packed, m, s, layout, int(size), len(params))
    return list(out[:, :b].unbind(0))


@functools.lru_cache(maxsize=None)
def _compiled_view_pixels(backend):
    """One torch.compile wrapper per backend, shared by every loader: dynamo keys its graphs by the wrapper's
    backend, so a second wrapper would compile the same graph again.

    dynamic=False: the loader pads to one batch shape; a new shape (another loader) compiles its own static
    graph instead of turning this one dynamic. fullgraph: a graph break is an error, not a silent slow path.
    """
    return torch.compile(view_pixels, backend=backend, dynamic=False, fullgraph=True)


class CompiledPixels:
    """:func:`view_pixels` through ``torch.compile`` (one static-shape graph per input shape), eager as the fallback.

    strict: a compile or run failure raises; otherwise it is logged as a warning (``error`` keeps
    it) and this and every later call run eagerly, so that a training run does not die of an
    optimisation. Results equal the eager ones to float rounding.
    """

    def __init__(self, backend: str = "inductor", strict: bool = False):
        self.backend, self.strict, self.error = backend, strict, None
        self._fn = _compiled_view_pixels(backend)

    def __call__(self, *args):
        if self.error is None:
            try:
                return self._fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported, and eager recomputes (or raises the real error)
                if self.strict:
                    raise
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("torch.compile of the augmentation (backend %s) failed, running it eagerly: %s",
                            self.backend, self.error[:2000])
                warnings.warn(f"torch.compile of the augmentation failed, running it eagerly: {self.error[:500]}",
                              RuntimeWarning, stacklevel=2)
        return view_pixels(*args)


def make_views(images_uint8: torch.Tensor, gen: torch.Generator, recipe: Recipe, size: int, num_views: int, mean, std,
               *, index: torch.Tensor | None = None, fused: bool | None = None, pixels=view_pixels,
               rows: int | None = None) -> list[torch.Tensor]:
    """``num_views`` independent views of one decoded batch uint8 [B,3,H,W] (decoded once, augmented K times).

    index: int64 [B] on the images' device: the views are those of ``images_uint8[index]`` (a gather
    the fused kernel does in place). Returns num_views normalised float32 [B,3,size,size] on the
    images' device. fused: the compiled CPU kernel (:mod:`ltssl.data.fused`) instead of batched
    torch ops on the images' device (:func:`device_views`, with ``pixels`` and ``rows``); None = on
    CPU tensors. Both draw the same parameters from ``gen`` and agree to float rounding.
    """
    fused = images_uint8.device.type == "cpu" if fused is None else fused
    _, _, h, w = images_uint8.shape
    b = images_uint8.shape[0] if index is None else len(index)
    params = draw_params(gen, b, h, w, recipe, num_views)
    if not fused:
        return device_views(images_uint8, params, size, mean, std, index=index, pixels=pixels, rows=rows)
    # deferred: numba's import and first compilation cost about a second; GPU-only jobs never need it
    from .fused import fused_views

    plain = recipe.blur_p == 0 and recipe.solarize_p == 0
    views = fused_views(images_uint8, params, size, mean, std, normalise=plain, index=index)
    if plain:
        return views
    return [normalize(_blur_solarize(v, p), mean, std) for v, p in zip(views, params)]


def eval_transform(images_uint8: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """No augmentation: resize to size x size when needed (antialiased bilinear), normalise."""
    x = to_float(images_uint8)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return normalize(x, mean, std)
