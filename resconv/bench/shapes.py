"""The layers a benchmark run measures: ResNet-18's (:func:`resconv.models.resnet18_layers`)
and the scaled-down ones of the CPU smoke run."""
from __future__ import annotations

from dataclasses import replace

from ..models.layers import IMAGE_SIZE, ConvLayer, resnet18_layers

VARIANTS = tuple(IMAGE_SIZE) + ("smoke",)


def smoke_layers(channel_div: int = 8, image_size: int = 8) -> list[ConvLayer]:
    """Small layers for the CPU smoke run, quick enough for Triton's interpreter: from the
    CIFAR ResNet-18 at ``image_size`` pixels, the first layer (RGB input that needs no
    gradient) and the first residual layer (BN + add + ReLU, gradients for input and
    residual): between them every code path of the harness. Channels are divided by
    ``channel_div`` (RGB stays 3)."""
    out = []
    for layer in resnet18_layers("cifar", image_size):
        if layer.first or (layer.residual and not any(o.residual for o in out)):
            C = layer.C if layer.first else max(1, layer.C // channel_div)
            out.append(replace(layer, variant="smoke", C=C, K=max(1, layer.K // channel_div), count=1,
                               names=(layer.name,)))
    return out


def layers_for(variants, image_size: int | None = None) -> list[ConvLayer]:
    """The layers of several variants ('imagenet', 'cifar', 'smoke'), in that order."""
    out = []
    for v in variants:
        out += smoke_layers() if v == "smoke" else resnet18_layers(v, image_size)
    return out
