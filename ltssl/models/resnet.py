"""ResNets: ResNet-18 with the CIFAR stem, and torchvision's ResNet-50.

The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps 32 px inputs at 32x32
through the first stage, as in the SimSiam CIFAR recipe and Liu et al. (ICLR 2022).
The classification layer is removed (``fc = Identity``): the output is the
pooled feature, 512-d (ResNet-18) or 2048-d (ResNet-50).
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

from ltssl.models.registry import norm_layer, register_backbone


def _headless(net: nn.Module) -> nn.Module:
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


@register_backbone("resnet18_cifar")
def resnet18_cifar(norm: str, image_size: int) -> nn.Module:
    net = torchvision.models.resnet18(weights=None, norm_layer=norm_layer(norm))
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return _headless(net)


@register_backbone("resnet50")
def resnet50(norm: str, image_size: int) -> nn.Module:
    # zero_init_residual: the last BN of each block starts at 0 (MoCo/SimSiam ImageNet recipes)
    net = torchvision.models.resnet50(weights=None, norm_layer=norm_layer(norm), zero_init_residual=True)
    return _headless(net)
