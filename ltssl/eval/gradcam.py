"""Grad-CAM (Selvaraju et al., ICCV 2017) of an encoder, with forward/backward hooks.

For a layer with activations ``A`` [B, C, h, w] and a scalar target ``y_b`` per image,
the map is ``relu(sum_c alpha_c A_c)`` with ``alpha_c = mean_{h,w} d y_b / d A_c``,
upsampled to the image size and scaled to [0, 1] per image. An SSL encoder has no
class logits, so the default target is the squared L2 norm of the image's feature
vector (what the whole representation responds to); pass ``target`` to use e.g. a
probe's logit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def last_conv(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` of ``model`` (the usual Grad-CAM layer)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("gradcam: the model has no Conv2d layer")
    return convs[-1]


def gradcam(
    model: nn.Module,
    images: Tensor,
    layer: nn.Module | None = None,
    target: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Grad-CAM maps [B, H, W] in [0, 1] of ``images`` [B, 3, H, W] at ``layer`` (default: last conv).

    ``target(output [B, ...]) -> [B]``; default ``output.pow(2).sum(1)``. The model is
    run in eval mode and left in the mode it was in.
    """
    layer = layer if layer is not None else last_conv(model)
    target = target if target is not None else (lambda out: out.flatten(1).pow(2).sum(1))
    saved: dict[str, Tensor] = {}

    def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        # A tensor hook (not a module backward hook) tolerates in-place ops after the layer.
        saved["act"] = output
        output.register_hook(lambda g: saved.__setitem__("grad", g))

    hooks = [layer.register_forward_hook(keep)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            target(model(x)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    act, grad = saved["act"].detach(), saved["grad"].detach()
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).amin(1)[:, None, None]
    hi = cam.flatten(1).amax(1)[:, None, None]
    return (cam - lo) / (hi - lo).clamp_min(1e-12)
