"""Batched augmentation ops equal torchvision's per-image definitions; parameters come only from the generator."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from ltssl.data import augment as A


def test_crop_resize_flip_equals_torchvision_resized_crop():
    gen = A.generator_for(0)
    for (h, w, s) in [(32, 32, 32), (32, 64, 32), (64, 64, 24)]:
        x = torch.rand(12, 3, h, w, generator=gen)
        boxes = A.crop_boxes(gen, 12, h, w, (0.2, 1.0), (3 / 4, 4 / 3))
        flips = torch.rand(12, generator=gen) < 0.5
        got = A.resized_crop(x, boxes, flips, s)
        for i in range(12):
            ref = TF.resized_crop(x[i], *[int(v) for v in boxes[i]], [s, s], antialias=True)
            ref = ref.flip(-1) if flips[i] else ref
            assert torch.allclose(got[i], ref, atol=1e-5)


def test_crop_boxes_follow_torchvision_rules():
    boxes = A.crop_boxes(A.generator_for(1), 20000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.18 and area.max() <= 1.0 and 0.5 < area.mean() < 0.65
    ratio = w / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.7
    wide = A.crop_boxes(A.generator_for(1), 2000, 32, 64, (1.0, 1.0), (1.0, 1.0))  # relative aspect: whole 2:1 image
    assert (wide[:, 2] == 32).all() and (wide[:, 3] == 64).all()


def test_colour_ops_equal_torchvision():
    gen = A.generator_for(2)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    x[0] = 0.5  # grey: hue undefined
    f = torch.linspace(0.6, 1.4, 16).view(-1, 1, 1, 1)
    shift = torch.linspace(-0.5, 0.5, 16).view(-1, 1, 1, 1)
    for i in range(16):
        fi, si = float(f[i]), float(shift[i])
        assert torch.allclose(A.adjust_hue(x[i:i + 1], shift[i:i + 1])[0], TF.adjust_hue(x[i], si), atol=1e-5)
        sat = A._blend(x[i:i + 1], A.grayscale(x[i:i + 1]), f[i:i + 1])[0]
        assert torch.allclose(sat, TF.adjust_saturation(x[i], fi), atol=1e-6)
        mean = A.grayscale(x[i:i + 1]).mean(dim=(1, 2, 3), keepdim=True)
        assert torch.allclose(A._blend(x[i:i + 1], mean, f[i:i + 1])[0], TF.adjust_contrast(x[i], fi), atol=1e-6)
    assert torch.allclose(A.grayscale(x)[:, 0], TF.rgb_to_grayscale(x)[:, 0], atol=1e-6)


def test_views_depend_only_on_the_generator():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for recipe in ("cifar", "imagenet"):
        r = A.get_recipe(recipe)
        torch.manual_seed(0)
        a = A.make_views(x, A.generator_for(5, 1, 2, 0), r, 32, 2, (0.5,) * 3, (0.25,) * 3)
        torch.manual_seed(1)  # the global RNG is never read
        b = A.make_views(x, A.generator_for(5, 1, 2, 0), r, 32, 2, (0.5,) * 3, (0.25,) * 3)
        c = A.make_views(x, A.generator_for(5, 1, 3, 0), r, 32, 2, (0.5,) * 3, (0.25,) * 3)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert A.seed_for(1, 2, 3) != A.seed_for(1, 2, 4) != A.seed_for(1, 3, 3)


def test_eval_transform_is_normalisation_only():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = A.eval_transform(x, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(out, (x.float() / 255 - 0.5) / 0.25, atol=1e-6)
    assert A.eval_transform(torch.zeros(2, 3, 32, 64, dtype=torch.uint8), 32, (0,) * 3, (1,) * 3).shape == (2, 3, 32, 32)


def test_fused_cpu_kernel_equals_the_batched_torch_path():
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=gen)
    x[0] = 128  # grey: hue undefined
    wide = torch.randint(0, 256, (6, 3, 32, 64), dtype=torch.uint8, generator=gen)
    for images, size in ((x, 32), (x.contiguous(memory_format=torch.channels_last), 24), (wide, 32)):
        for recipe in ("cifar", "imagenet"):
            r = A.get_recipe(recipe)
            args = (r, size, 2, (0.5, 0.45, 0.4), (0.25, 0.25, 0.25))
            fused = A.make_views(images, A.generator_for(9, 1), *args, fused=True)
            batched = A.make_views(images, A.generator_for(9, 1), *args, fused=False)
            default = A.make_views(images, A.generator_for(9, 1), *args)  # on the CPU: the fused kernel
            assert all(torch.equal(a, b) for a, b in zip(default, fused))
            for a, b in zip(fused, batched):
                assert a.shape == b.shape == (images.shape[0], 3, size, size) and a.dtype == torch.float32
                assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_fused_views_do_not_depend_on_the_thread_count():
    x = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    r = A.get_recipe("cifar")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(A.make_views(x, A.generator_for(2), r, 32, 2, (0.5,) * 3, (0.25,) * 3, fused=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
