"""The ResNet-18 layer table: every distinct fused conv of resconv's ResNet-18, read off the
model rather than typed by hand.

:func:`resnet18_layers` runs the model once on the ``meta`` device (no memory, no compute)
with forward hooks on every fused conv + BatchNorm module and keeps each distinct (conv shape,
epilogue) pair with the names of the modules where it occurs. The same conv shape appears
with two epilogues in a ResNet stage (``conv1``: BN + ReLU; ``conv2``: BN + add + ReLU): both
are listed. ``resconv verify``, ``resconv bench`` and ``resconv inspect`` take their layers
from here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from ..nn import ConvBn2d, ConvBnAddReLU2d, ConvBnReLU2d

# Input resolution and classes of each model variant (ImageNet 224x224, CIFAR 32x32).
IMAGE_SIZE = {"imagenet": 224, "cifar": 32}
NUM_CLASSES = {"imagenet": 1000, "cifar": 10}
FUSED_CONV_BN = (ConvBn2d, ConvBnReLU2d, ConvBnAddReLU2d)


@dataclass(frozen=True)
class ConvLayer:
    """One distinct conv + BatchNorm (+ residual add) (+ ReLU) of a model, batch size aside.

    Sizes in the field's names: input ``C x H x W``, filters ``K x C x R x S``, output
    ``K x P x Q``; ``stride`` and ``padding`` (symmetric) as ``(h, w)`` pairs.
    """

    variant: str  # model it comes from: 'imagenet', 'cifar' (or 'smoke', a scaled-down copy)
    name: str  # module path of its first occurrence, e.g. 'layer2.0.conv1'
    C: int
    K: int
    H: int
    W: int
    R: int
    S: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    relu: bool
    residual: bool
    first: bool = False  # the network's first layer: its input needs no gradient
    count: int = 1  # occurrences in the model
    names: tuple[str, ...] = field(default=(), compare=False)  # every occurrence, in network order

    @property
    def P(self) -> int:
        return (self.H + 2 * self.padding[0] - self.R) // self.stride[0] + 1

    @property
    def Q(self) -> int:
        return (self.W + 2 * self.padding[1] - self.S) // self.stride[1] + 1

    @property
    def kind(self) -> str:
        """'stem', '3x3s1', '3x3s2', '1x1s2', ... (filter size and stride)."""
        if self.first:
            return "stem"
        return f"{self.R}x{self.S}s{self.stride[0]}"

    @property
    def epilogue(self) -> str:
        return "bn" + ("+add" if self.residual else "") + ("+relu" if self.relu else "")

    @property
    def label(self) -> str:
        """Short unique name, e.g. 'imagenet/layer2.0.conv1 3x3s2 64>128 56px bn+relu'."""
        return f"{self.variant}/{self.name} {self.kind} {self.C}>{self.K} {self.H}px {self.epilogue}"

    def key(self) -> tuple:
        return (self.C, self.K, self.H, self.W, self.R, self.S, self.stride, self.padding, self.relu,
                self.residual, self.first)

    def as_dict(self) -> dict:
        return dict(
            variant=self.variant, name=self.name, kind=self.kind, epilogue=self.epilogue, label=self.label,
            C=self.C, K=self.K, H=self.H, W=self.W, R=self.R, S=self.S, P=self.P, Q=self.Q,
            stride=list(self.stride), padding=list(self.padding), relu=self.relu, residual=self.residual,
            first=self.first, count=self.count,
        )


@functools.lru_cache(maxsize=None)
def _layers(variant: str, size: int) -> tuple:
    return tuple(_trace_layers(variant, size))


def resnet18_layers(variant: str = "imagenet", image_size: int | None = None) -> list[ConvLayer]:
    """Every distinct fused conv of ``resconv.models.resnet18(variant=variant)``, in network order.

    Args:
        variant (str): 'imagenet' or 'cifar'.
        image_size (int or None): input height and width; None: 224 (imagenet) or 32 (cifar).
    Returns:
        list of ConvLayer with ``count`` = occurrences in the model and ``names`` their modules.
    Raises:
        ValueError: an unknown variant.
    """
    if variant not in IMAGE_SIZE:
        raise ValueError(f"variant: expected one of {tuple(IMAGE_SIZE)}, got {variant!r}")
    return list(_layers(variant, IMAGE_SIZE[variant] if image_size is None else int(image_size)))


def _trace_layers(variant: str, size: int) -> list[ConvLayer]:
    from .resnet import resnet18

    # Built on the CPU (0.4 s; initialising on "meta" goes through torch._refs, which
    # imports torch._dynamo: seconds), then moved to "meta": the forward costs nothing.
    model = resnet18(num_classes=NUM_CLASSES[variant], variant=variant).to("meta").eval()
    for m in model.modules():  # shapes only: the reference runs on "meta", whatever RESCONV_BACKEND says
        if isinstance(m, FUSED_CONV_BN):
            m.backend = "torch"
    found: dict[tuple, ConvLayer] = {}
    first_name = None

    def hook_for(name):
        def hook(mod, args, out):
            nonlocal first_name
            first_name = first_name or name
            _, C, H, W = args[0].shape
            layer = ConvLayer(
                variant=variant, name=name, C=C, K=mod.out_channels, H=H, W=W,
                R=mod.kernel_size[0], S=mod.kernel_size[1], stride=tuple(mod.stride), padding=tuple(mod.padding),
                relu=isinstance(mod, (ConvBnReLU2d, ConvBnAddReLU2d)), residual=isinstance(mod, ConvBnAddReLU2d),
                first=name == first_name, names=(name,),
            )
            assert tuple(out.shape[2:]) == (layer.P, layer.Q), (name, out.shape, layer)
            k = layer.key()
            if k in found:
                old = found[k]
                found[k] = replace(old, count=old.count + 1, names=old.names + (name,))
            else:
                found[k] = layer

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, FUSED_CONV_BN)]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return list(found.values())
