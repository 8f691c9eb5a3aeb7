"""The CPU augmentation as one compiled kernel per sample: crop + resize + flip, colour jitter, grayscale, normalise.

:mod:`ltssl.data.augment` draws every random parameter (:class:`~ltssl.data.augment.ViewParams`) from
the step's generator; this module only does the pixel work, on CPU, with numba: each sample's
view is computed in one pass over its pixels (separable antialiased bilinear resampling over the
few non-zero taps, then the jitter operations in the sample's order, grayscale, normalisation)
instead of a sequence of batched tensor operations that each read and write the whole batch. The
operations are those of the batched torch path (torchvision's definitions); results agree with it
to float rounding (``tests/test_data_augment.py``). Samples are split into contiguous chunks run on
a thread pool (the kernel releases the GIL), so a sample's output never depends on the thread count.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

_GRAY = (np.float32(0.2989), np.float32(0.587), np.float32(0.114))  # same luma weights as augment.GRAY_WEIGHTS
_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


@numba.njit(nogil=True, cache=True)
def _taps(start, length, in_size, out_size, weights, first, last):
    """Antialiased bilinear weights of the crop [start, start + length) resized to out_size (augment._resize_weights).

    weights[i, j] for the input pixels first[i] <= j < last[i] (zero elsewhere), normalised to sum 1.
    """
    scale = np.float32(length / out_size)
    support = max(scale, np.float32(1.0))
    end = start + length
    for i in range(out_size):
        centre = start + (np.float32(i) + np.float32(0.5)) * scale
        total = np.float32(0.0)
        first[i], last[i] = in_size, 0
        for j in range(in_size):
            pos = np.float32(j) + np.float32(0.5)
            w = np.float32(1.0) - abs(pos - centre) / support
            if w > 0 and pos >= start and pos <= end:
                weights[i, j] = w
                total += w
                first[i] = min(first[i], j)
                last[i] = j + 1
            else:
                weights[i, j] = 0.0
        inv = np.float32(1.0) / max(total, np.float32(1e-12))
        for j in range(first[i], last[i]):
            weights[i, j] *= inv


@numba.njit(nogil=True, cache=True, inline="always")
def _clamp01(v):
    return min(max(v, np.float32(0.0)), np.float32(1.0))


@numba.njit(nogil=True, cache=True, inline="always")
def _luma(x, i, j):
    return _GRAY[0] * x[0, i, j] + _GRAY[1] * x[1, i, j] + _GRAY[2] * x[2, i, j]


@numba.njit(nogil=True, cache=True, fastmath=True)
def _crop(img, top, left, h, w, flip, wy, wx, fy, ly, fx, lx, tmp, out):
    """out [3,S,S] in [0,1] = rows then columns of uint8 img [H,W,3] through the crop's taps (flip: columns reversed)."""
    size = out.shape[1]
    height, width = img.shape[0], img.shape[1]
    _taps(top, h, height, size, wy, fy, ly)
    _taps(left, w, width, size, wx, fx, lx)
    inv255 = np.float32(1.0 / 255.0)
    x0, x1 = fx[0], lx[size - 1]  # the columns any output column reads (taps move right with the output)
    for i in range(size):  # rows: tmp[i, x, c] (channels innermost, as the image)
        for x in range(x0, x1):
            for c in range(3):
                tmp[i, x, c] = 0.0
        for y in range(fy[i], ly[i]):
            wgt = wy[i, y]
            for x in range(x0, x1):
                for c in range(3):
                    tmp[i, x, c] += wgt * (np.float32(img[y, x, c]) * inv255)
    for j in range(size):  # columns
        jj = size - 1 - j if flip else j
        for i in range(size):
            r = g = b = np.float32(0.0)
            for x in range(fx[jj], lx[jj]):
                wgt = wx[jj, x]
                r += tmp[i, x, 0] * wgt
                g += tmp[i, x, 1] * wgt
                b += tmp[i, x, 2] * wgt
            out[0, i, j] = _clamp01(r)
            out[1, i, j] = _clamp01(g)
            out[2, i, j] = _clamp01(b)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _hue(x, shift):
    """augment.adjust_hue on one image [3,S,S] in place: RGB -> HSV hue, rotate by shift turns, closed-form HSV -> RGB."""
    size = x.shape[1]
    for i in range(size):
        for j in range(size):
            r, g, b = x[0, i, j], x[1, i, j], x[2, i, j]
            maxc = max(max(r, g), b)
            minc = min(min(r, g), b)
            chroma = maxc - minc
            inv = np.float32(1.0) / (chroma if chroma != 0 else np.float32(1.0))
            rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
            if maxc == r:
                hue = bc - gc
            elif maxc == g:
                hue = np.float32(2.0) + rc - bc
            else:
                hue = np.float32(4.0) + gc - rc
            hue = hue / np.float32(6.0) + shift
            six_hue = np.float32(6.0) * (hue - np.floor(hue))  # in [0, 6)
            for c in range(3):
                k = np.float32(5 - 2 * c) + six_hue  # in [1, 11): (n + 6 H) mod 6 is one subtraction
                k = k - np.float32(6.0) if k >= np.float32(6.0) else k
                ramp = _clamp01(min(k, np.float32(4.0) - k))
                x[c, i, j] = _clamp01(maxc - chroma * ramp)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _jitter(x, factors, order):
    """augment.color_jitter on one image [3,S,S] in place: brightness, contrast, saturation, hue in ``order``."""
    size = x.shape[1]
    for position in range(4):
        op = order[position]
        f = factors[op]
        if op == 0:
            for c in range(3):
                for i in range(size):
                    for j in range(size):
                        x[c, i, j] = _clamp01(x[c, i, j] * f)
        elif op == 1:
            mean = np.float32(0.0)
            for i in range(size):
                for j in range(size):
                    mean += _luma(x, i, j)
            mean = (1 - f) * (mean / np.float32(size * size))
            for c in range(3):
                for i in range(size):
                    for j in range(size):
                        x[c, i, j] = _clamp01(f * x[c, i, j] + mean)
        elif op == 2:
            for i in range(size):
                for j in range(size):
                    grey = (1 - f) * _luma(x, i, j)
                    for c in range(3):
                        x[c, i, j] = _clamp01(f * x[c, i, j] + grey)
        else:
            _hue(x, f)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _views(images, index, boxes, flips, jitter, factors, order, gray, mean, std, out, lo, hi):
    """Views lo..hi-1: out[k] (float32 [3,S,S]) from images[index[k % B]] (uint8 [N,H,W,3]) with sample k's parameters."""
    size = out.shape[2]
    height, width = images.shape[1], images.shape[2]
    wy, wx = np.empty((size, height), np.float32), np.empty((size, width), np.float32)
    fy, ly = np.empty(size, np.int64), np.empty(size, np.int64)
    fx, lx = np.empty(size, np.int64), np.empty(size, np.int64)
    tmp = np.empty((size, width, 3), np.float32)
    batch = index.shape[0]
    inv_std = np.float32(1.0) / std
    for k in range(lo, hi):
        x = out[k]
        _crop(images[index[k % batch]], boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3], flips[k], wy, wx, fy, ly, fx, lx, tmp, x)
        if jitter[k]:
            _jitter(x, factors[k], order[k])
        if gray[k]:
            for i in range(size):
                for j in range(size):
                    v = _luma(x, i, j)
                    x[0, i, j], x[1, i, j], x[2, i, j] = v, v, v
        for c in range(3):
            for i in range(size):
                for j in range(size):
                    x[c, i, j] = (x[c, i, j] - mean[c]) * inv_std[c]


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if threads not in _POOL:
            _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ltssl-augment")
        return _POOL[threads]


def fused_views(images_uint8: torch.Tensor, params: list, size: int, mean, std, *, normalise: bool = True,
                index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One view per entry of ``params`` (:class:`~ltssl.data.augment.ViewParams`) of every image, on CPU.

    images_uint8: uint8 [N,3,H,W] on CPU (any memory format); index: int64 [B], the images to use
    (default all: B = N), read in place (no gathered copy). Returns float32 [B,3,size,size] per view,
    normalised with mean/std (fractions of 1) when ``normalise``, else in [0,1]. Crop, flip, colour
    jitter and grayscale only: blur and solarisation are left to the caller (torch ops).
    """
    index = np.arange(images_uint8.shape[0]) if index is None else index.numpy()
    b = len(index)
    k = len(params)
    nhwc = images_uint8.permute(0, 2, 3, 1).numpy()  # a view: contiguous for FFCV's channels-last batches
    cat = lambda name, dtype: np.ascontiguousarray(torch.cat([getattr(p, name) for p in params]).numpy(), dtype=dtype)  # noqa: E731
    boxes = cat("boxes", np.float32)
    flips = cat("flips", np.bool_)
    zeros = np.zeros(b * k, np.bool_)
    jitter = cat("jitter", np.bool_) if params[0].jitter is not None else zeros
    factors = cat("factors", np.float32) if params[0].jitter is not None else np.zeros((b * k, 4), np.float32)
    order = cat("order", np.int64) if params[0].jitter is not None else np.zeros((b * k, 4), np.int64)
    gray = cat("gray", np.bool_) if params[0].gray is not None else zeros
    m, s = (np.asarray(mean, np.float32), np.asarray(std, np.float32)) if normalise else (np.zeros(3, np.float32), np.ones(3, np.float32))
    out = np.empty((k * b, 3, size, size), np.float32)
    threads = max(1, min(torch.get_num_threads(), k * b))
    bounds = np.linspace(0, k * b, threads + 1).astype(int)
    args = (nhwc, np.ascontiguousarray(index, dtype=np.int64), boxes, flips, jitter, factors, order, gray, m, s, out)
    if threads == 1:
        _views(*args, 0, k * b)
    else:
        list(_pool(threads).map(lambda i: _views(*args, bounds[i], bounds[i + 1]), range(threads)))
    return list(torch.from_numpy(out).view(k, b, 3, size, size).unbind(0))
