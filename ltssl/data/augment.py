"""SSL view augmentation on batched tensors, with per-sample parameters from an explicit generator.

The recipes are those of SimSiam / MoCo v2 as used by Liu et al. (ICLR 2022):

- ``cifar``: RandomResizedCrop(S, scale 0.2-1, ratio 3/4-4/3), horizontal flip p 0.5,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, normalisation.
- ``imagenet``: the same plus Gaussian blur (sigma 0.1-2, kernel ~10 % of S) with p 0.5 (MoCo v2)
  and solarisation (threshold 0.5) with p 0.2 (BYOL's second-view value, here on every view).

Every random parameter is drawn on the CPU from the ``torch.Generator`` passed in (so the same
generator state gives the same views on CPU and GPU, and nothing reads torch's global RNG); the
pixel work runs batched on the images' device, and on the CPU in one compiled kernel per sample
(:mod:`ltssl.data.fused`, the same operations). The operations follow torchvision's definitions
(``RandomResizedCrop.get_params``, antialiased bilinear ``resized_crop``,
``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``, colour-jitter operations in
a random order per sample), with one deliberate difference: a non-square source (the
semi-synthetic 2:1 images) draws aspect ratios relative to its own aspect, so that scale 1 is
the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

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
    centre = start.view(-1, 1, 1) + (torch.arange(out_size, dtype=start.dtype).view(1, -1, 1) + 0.5) * scale
    pos = torch.arange(in_size, dtype=start.dtype).view(1, 1, -1) + 0.5
    w = (1.0 - (pos - centre).abs() / support).clamp_(min=0.0)
    inside = (pos >= start.view(-1, 1, 1)) & (pos <= (start + length).view(-1, 1, 1))
    w = w * inside
    # an output centre beyond the last inside pixel centre keeps that pixel (edge replication)
    total = w.sum(-1, keepdim=True)
    return w / total.clamp(min=1e-12)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, flip it horizontally where ``flips``, resize to size x size.

    images: float [B,3,H,W]; boxes: [B,4] (top, left, h, w) in pixels; flips: bool [B].
    Separable antialiased bilinear resampling as two batched matrix products,
    ``out = R_y @ image @ R_x^T`` with per-sample [S,H] and [S,W] weight matrices (the flip reverses
    R_x's rows): one matmul pair per batch, and the same filter as torchvision's antialiased resize.
    """
    _, _, height, width = images.shape
    boxes = boxes.to(torch.float32)
    top, left, ch, cw = boxes.unbind(1)
    ry = _resize_weights(top, ch, height, size)
    rx = _resize_weights(left, cw, width, size)
    rx = torch.where(flips.cpu().view(-1, 1, 1), rx.flip(1), rx)
    ry = ry.to(images.device, images.dtype)                       # [B,S,H]
    rxt = rx.transpose(1, 2).to(images.device, images.dtype)      # [B,W,S]
    b = images.shape[0]
    # channels side by side, so each product is one bmm over the batch: [B,H,3W] -> [B,S,3W] -> [B,3S,S]
    rows = torch.bmm(ry, images.permute(0, 2, 1, 3).reshape(b, height, 3 * width))
    out = torch.bmm(rows.view(b, size * 3, width), rxt)
    return out.view(b, size, 3, size).permute(0, 2, 1, 3).contiguous()


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
    offsets = torch.tensor(_HSV_OFFSETS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
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

    x: float [B,3,H,W] in [0,1]; apply, factors, order: from :func:`draw_jitter` (on the CPU).
    """
    device = x.device
    factors_d = factors.to(device)
    x = x.clone()
    for position in range(4):
        for op in range(4):
            sel = torch.nonzero(apply & (order[:, position] == op)).flatten()
            if sel.numel() == 0:
                continue
            sel_d = sel.to(device)
            x.index_copy_(0, sel_d, _jitter_op(x.index_select(0, sel_d), op, factors_d.index_select(0, sel_d)[:, op]))
    return x


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
    sel = apply.to(x.device).view(-1, 1, 1, 1)
    return torch.where(sel, grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur where ``apply`` (bool [B]) with per-sample ``sigma`` (float32 [B], pixels); kernel ~10 % of the side, odd."""
    n, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    sel = torch.nonzero(apply).flatten()
    if sel.numel() == 0:
        return x
    coords = torch.arange(k, dtype=torch.float32) - k // 2
    kern = torch.exp(-(coords[None] ** 2) / (2 * sigma[sel, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).to(x.device)  # [m,k]
    sel_d = sel.to(x.device)
    part = x.index_select(0, sel_d)
    m = part.shape[0]
    flat = part.reshape(1, m * c, h, w)
    kx = kern.repeat_interleave(c, 0).view(m * c, 1, 1, k)
    ky = kern.repeat_interleave(c, 0).view(m * c, 1, k, 1)
    pad = k // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kx, groups=m * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), ky, groups=m * c)
    out = x.clone()
    out.index_copy_(0, sel_d, flat.view(m, c, h, w))
    return out


def random_solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Solarisation (1 - x above ``threshold``) where ``apply`` (bool [B])."""
    sel = apply.to(x.device).view(-1, 1, 1, 1)
    return torch.where(sel & (x >= threshold), 1.0 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (any memory format) -> float32 in [0,1], contiguous."""
    return images.to(torch.float32).div_(255.0).contiguous()


@dataclass
class ViewParams:
    """Every random parameter of one view of B images (CPU tensors; None where the recipe skips the step)."""

    boxes: torch.Tensor                    # float64 [B,4]: crop top, left, height, width (pixels)
    flips: torch.Tensor                    # bool [B]
    jitter: torch.Tensor | None = None     # bool [B]: colour jitter applied
    factors: torch.Tensor | None = None    # float32 [B,4]: brightness, contrast, saturation, hue
    order: torch.Tensor | None = None      # int64 [B,4]: jitter operations in the sample's order
    gray: torch.Tensor | None = None       # bool [B]
    blur: torch.Tensor | None = None       # bool [B]
    sigma: torch.Tensor | None = None      # float32 [B]: blur sigma (pixels)
    solarize: torch.Tensor | None = None   # bool [B]


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


def apply_view(images01: torch.Tensor, params: ViewParams, size: int) -> torch.Tensor:
    """The batched torch path: one view of float [B,3,H,W] in [0,1] -> float [B,3,size,size] in [0,1], not normalised."""
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


def augment_view(images01: torch.Tensor, gen: torch.Generator, recipe: Recipe, size: int, mean, std) -> torch.Tensor:
    """One SSL view of every image: float [B,3,H,W] in [0,1] -> normalised float [B,3,size,size] (the torch path)."""
    b, _, h, w = images01.shape
    return normalize(apply_view(images01, draw_view_params(gen, b, h, w, recipe), size), mean, std)


def make_views(images_uint8: torch.Tensor, gen: torch.Generator, recipe: Recipe, size: int, num_views: int, mean, std,
               *, index: torch.Tensor | None = None, fused: bool | None = None) -> list[torch.Tensor]:
    """``num_views`` independent views of one decoded batch uint8 [B,3,H,W] (decoded once, augmented K times).

    index: int64 [B] on the images' device: the views are those of ``images_uint8[index]`` (a gather
    the fused kernel does in place). Returns num_views normalised float32 [B,3,size,size] on the
    images' device. fused: the compiled
    CPU kernel (:mod:`ltssl.data.fused`) instead of batched torch ops; None = on CPU tensors. Both
    draw the same parameters from ``gen`` and agree to float rounding.
    """
    fused = images_uint8.device.type == "cpu" if fused is None else fused
    if not fused:
        x = to_float(images_uint8 if index is None else images_uint8.index_select(0, index))
        return [augment_view(x, gen, recipe, size, mean, std) for _ in range(num_views)]
    # deferred: numba's import and first compilation cost about a second; GPU-only jobs never need it
    from .fused import fused_views

    _, _, h, w = images_uint8.shape
    b = images_uint8.shape[0] if index is None else len(index)
    threads = torch.get_num_threads()
    # The draws are a few dozen small torch ops; on several intra-op threads each one wakes the idle
    # threads, whose spin-waiting costs many times the work (the kernel uses its own pool of `threads`).
    torch.set_num_threads(1)
    try:
        params = [draw_view_params(gen, b, h, w, recipe) for _ in range(num_views)]
    finally:
        torch.set_num_threads(threads)
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
