"""ResNet-18 (and its blocks) built from resconv's fused modules.

The ImageNet variant has torchvision's exact ``state_dict`` keys and shapes
(``torchvision.models.resnet18().state_dict()`` loads into it and gives the same logits);
the CIFAR variant uses the common 3x3-stride-1 stem without max-pooling (He et al. 2016,
section 4.2). Each conv and its BatchNorm run as one fused op: the block keeps the
BatchNorm registered under torchvision's name (``bn1``...) and the fused conv reads it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import ConvBn2d, ConvBnAddReLU2d, ConvBnReLU2d, Conv2d, FoldedBatchNorm2d

Tensor = torch.Tensor


def _fused(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, owner: nn.Module):
    """A fused module computing ``bn``, which stays registered in ``owner`` beside it."""
    return cls.from_modules(conv, bn, register_bn=False)._bind_bn_owner(owner)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)`` as two fused ops.

    Attributes and ``state_dict`` keys are torchvision's BasicBlock's: conv1, bn1, conv2, bn2,
    downsample (Sequential of a fused ConvBn2d and its BatchNorm) or None.
    Input Tensor[N, inplanes, H, W] -> Tensor[N, planes, H/stride, W/stride].
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        bn1, bn2 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        self.conv1 = _fused(ConvBnReLU2d, Conv2d(inplanes, planes, 3, stride, 1, bias=False), bn1, self)
        self.bn1 = bn1
        self.conv2 = _fused(ConvBnAddReLU2d, Conv2d(planes, planes, 3, 1, 1, bias=False), bn2, self)
        self.bn2 = bn2
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), identity)

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "BasicBlock":
        """A fused block sharing a torchvision (or timm) BasicBlock's Parameters and buffers."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv1 = _fused(ConvBnReLU2d, block.conv1, block.bn1, new)
        new.bn1 = block.bn1
        new.conv2 = _fused(ConvBnAddReLU2d, block.conv2, block.bn2, new)
        new.bn2 = block.bn2
        new.downsample = _fuse_downsample(block.downsample)
        new.stride = block.stride if hasattr(block, "stride") else block.conv1.stride[0]
        new.train(block.training)
        return new


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet-50 and up) as three fused ops:
    1x1 conv-bn-relu, 3x3 conv-bn-relu (stride here, as torchvision v1.5), 1x1 conv-bn-add-relu.
    Keys: conv1, bn1, conv2, bn2, conv3, bn3, downsample."""

    expansion = 4

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "Bottleneck":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv1 = _fused(ConvBnReLU2d, block.conv1, block.bn1, new)
        new.bn1 = block.bn1
        new.conv2 = _fused(ConvBnReLU2d, block.conv2, block.bn2, new)
        new.bn2 = block.bn2
        new.conv3 = _fused(ConvBnAddReLU2d, block.conv3, block.bn3, new)
        new.bn3 = block.bn3
        new.downsample = _fuse_downsample(block.downsample)
        new.stride = block.stride if hasattr(block, "stride") else block.conv2.stride[0]
        new.train(block.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), identity)


def _fuse_downsample(ds: Optional[nn.Module]) -> Optional[nn.Module]:
    """Sequential(conv1x1, bn) -> Sequential(fused ConvBn2d, FoldedBatchNorm2d), same keys."""
    if ds is None:
        return None
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) in (nn.Conv2d, Conv2d) \
            and type(ds[1]) in (nn.BatchNorm2d, nn.SyncBatchNorm) and ds[1].num_features == ds[0].out_channels:
        return _fused_downsample(ds[0], FoldedBatchNorm2d.sharing(ds[1]))
    return ds


def _downsample(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    return _fused_downsample(Conv2d(inplanes, planes, 1, stride, bias=False), FoldedBatchNorm2d(planes))


def _fused_downsample(conv: nn.Conv2d, folded: FoldedBatchNorm2d) -> nn.Sequential:
    """Sequential(ConvBn2d computing ``folded``, ``folded``): torchvision's keys 0.* and 1.*."""
    seq = nn.Sequential(ConvBn2d.from_modules(conv, folded, register_bn=False), folded)
    seq[0]._bind_bn_owner(seq)
    return seq


class ResNet(nn.Module):
    """ResNet with BasicBlocks, from resconv modules.

    Args:
        layers (sequence of 4 ints): blocks per stage ([2, 2, 2, 2] for ResNet-18).
        num_classes (int): size of the final linear layer.
        variant (str): 'imagenet' (7x7 stride-2 stem + 3x3 max-pool, torchvision's keys) or
            'cifar' (3x3 stride-1 stem, no max-pool).
    Input Tensor[N, 3, H, W] -> logits Tensor[N, num_classes].
    """

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, variant: str = "imagenet"):
        super().__init__()
        if variant not in ("imagenet", "cifar"):
            raise ValueError(f"variant: expected 'imagenet' or 'cifar', got {variant!r}")
        self.variant = variant
        bn1 = nn.BatchNorm2d(64)
        stem = Conv2d(3, 64, 7, 2, 3, bias=False) if variant == "imagenet" else Conv2d(3, 64, 3, 1, 1, bias=False)
        self.conv1 = _fused(ConvBnReLU2d, stem, bn1, self)
        self.bn1 = bn1
        self.maxpool = nn.MaxPool2d(3, 2, 1) if variant == "imagenet" else nn.Identity()
        self.inplanes = 64
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        ds = _downsample(self.inplanes, planes, stride) if (stride != 1 or self.inplanes != planes) else None
        layers = [BasicBlock(self.inplanes, planes, stride, ds)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, variant: str = "imagenet") -> ResNet:
    """ResNet-18 from resconv modules (11.7 M parameters for 1000 classes).

    Args:
        num_classes (int): output logits.
        variant ('imagenet' or 'cifar'): see :class:`ResNet`.
    Returns:
        ResNet, randomly initialised as torchvision does (no weights are downloaded).
    """
    return ResNet((2, 2, 2, 2), num_classes, variant)
