"""ResNet-18 written with plain torch.nn modules: the reference the apps compare resconv with.

Torchvision's ResNet-18 layout (BasicBlock: conv-bn-relu, conv-bn, ``+= identity``, relu)
with the same ``state_dict`` keys as :func:`resconv.models.resnet18`, so that weights load
both ways, and without needing torchvision. ``resconv verify``, ``resconv train --compare``
and the eager / torch.compile providers of ``resconv bench`` run it.
"""
from __future__ import annotations

import torch
from torch import nn


class TorchBasicBlock(nn.Module):
    """torchvision's BasicBlock: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H/stride, W/stride]."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TorchResNet(nn.Module):
    """ResNet-18 of torch.nn modules (variant 'imagenet' or 'cifar', as resconv's).
    Input Tensor[N, 3, H, W] -> logits Tensor[N, num_classes]."""

    def __init__(self, variant: str = "imagenet", num_classes: int = 1000):
        super().__init__()
        if variant == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        elif variant == "cifar":
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"variant: expected 'imagenet' or 'cifar', got {variant!r}")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(TorchBasicBlock(inplanes, planes, stride), TorchBasicBlock(planes, planes, 1)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_resnet18(num_classes: int = 1000, variant: str = "imagenet") -> TorchResNet:
    """ResNet-18 of plain torch.nn modules, keys as :func:`resconv.models.resnet18` (random
    PyTorch-default initialisation: load a state_dict into it)."""
    return TorchResNet(variant, num_classes)
