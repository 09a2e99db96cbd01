"""Plain and residual networks of any depth, built from resconv's fused modules: the nets of
He et al. 2016 ("Deep Residual Learning for Image Recognition", CVPR), section 4.2, and the
deep PlainNet of the gradient experiments.

One family, :class:`StagedNet`: a 3x3 stem conv (+ BatchNorm) + ReLU, stages of blocks (the
first block of every stage after the first halves the resolution and changes the width),
global average pooling, a linear classifier. Its depth counts the weighted layers:
``2 + 2 * (blocks in all stages)``. A block is

* ``'residual'``: resconv's :class:`~resconv.models.resnet.BasicBlock`,
  ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, with a 1x1 projection shortcut
  where the shape changes (He et al.'s option B; torchvision's); without BatchNorm the same
  block with conv biases (:class:`BasicBlockNoBN`);
* ``'plain'``: the same two convs without the shortcut (:class:`PlainBlock`).

Each conv + BatchNorm + ReLU (+ add) runs as one fused op; without BatchNorm a conv + ReLU is
:class:`resconv.nn.ConvReLU2d`. Input Tensor[N, in_channels, H, W] -> logits Tensor[N, num_classes].
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn import AddReLU, Conv2d, ConvBnReLU2d, ConvReLU2d
from .resnet import BasicBlock, _downsample

Tensor = torch.Tensor
BLOCKS = ("residual", "plain")
INITS = ("default", "kaiming")


def conv_unit(in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> nn.Module:
    """3x3 conv (padding 1) -> [BatchNorm2d] -> ReLU as one fused module (bias only without BN)."""
    if batch_norm:
        return ConvBnReLU2d(in_channels, out_channels, 3, stride, 1, bias=False)
    return ConvReLU2d(in_channels, out_channels, 3, stride, 1, bias=True)


class PlainBlock(nn.Module):
    """Two conv units and no shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``.
    Tensor[N, in_channels, H, W] -> Tensor[N, out_channels, H/stride, W/stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batch_norm: bool = True):
        super().__init__()
        self.conv1 = conv_unit(in_channels, out_channels, stride, batch_norm)
        self.conv2 = conv_unit(out_channels, out_channels, 1, batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class BasicBlockNoBN(nn.Module):
    """BasicBlock without BatchNorm: ``relu(conv2(relu(conv1(x))) + shortcut(x))``, conv
    biases, a 1x1 projection shortcut where the shape changes.
    Tensor[N, in_channels, H, W] -> Tensor[N, out_channels, H/stride, W/stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvReLU2d(in_channels, out_channels, 3, stride, 1)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1)
        self.add_relu = AddReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = Conv2d(in_channels, out_channels, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu(self.conv2(self.conv1(x)), identity)


def make_block(kind: str, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> nn.Module:
    """One block of :class:`StagedNet` (see the module docstring)."""
    if kind == "plain":
        return PlainBlock(in_channels, out_channels, stride, batch_norm)
    if not batch_norm:
        return BasicBlockNoBN(in_channels, out_channels, stride)
    ds = _downsample(in_channels, out_channels, stride) if (stride != 1 or in_channels != out_channels) else None
    return BasicBlock(in_channels, out_channels, stride, ds)


class StagedNet(nn.Module):
    """Stem, stages of plain or residual blocks, global average pooling, linear classifier.

    Args:
        block ('residual' or 'plain'): the block of every stage.
        widths (sequence of int): output channels of each stage (the stem has ``widths[0]``).
        blocks (sequence of int): blocks in each stage, same length as ``widths``.
        batch_norm (bool): a BatchNorm2d after every conv (False: conv biases instead).
        num_classes (int), in_channels (int).
        init ('default' or 'kaiming'): 'default' keeps torch.nn.Conv2d's own initialisation
            (Kaiming-uniform with a = sqrt(5): weight variance 1/(3 fan_in)); 'kaiming' draws
            conv weights from N(0, 2/fan_out) as He et al. 2015 and torchvision's ResNets.
            BatchNorm starts at weight 1, bias 0; conv biases at 0 under 'kaiming'.
    Attributes:
        conv1 (the stem), layer1 ... layerS (nn.Sequential of blocks), avgpool, fc, depth
        (weighted layers: 2 + 2 * sum(blocks)).
    Raises:
        ValueError: an unknown block or init, widths and blocks of different lengths, a
            stage with no block.
    """

    def __init__(self, block: str, widths: Sequence[int], blocks: Sequence[int], batch_norm: bool = True,
                 num_classes: int = 10, in_channels: int = 3, init: str = "default"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block: expected one of {BLOCKS}, got {block!r}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if len(widths) != len(blocks) or not widths or min(blocks) < 1:
            raise ValueError(f"blocks: expected at least one block per stage, one entry per width; got widths "
                             f"{tuple(widths)}, blocks {tuple(blocks)}")
        self.block, self.batch_norm, self.depth = block, batch_norm, 2 + 2 * sum(blocks)
        self.conv1 = conv_unit(in_channels, widths[0], 1, batch_norm)
        cin = widths[0]
        for s, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if s == 0 else 2
            stage = [make_block(block, cin, width, stride, batch_norm)]
            stage += [make_block(block, width, width, 1, batch_norm) for _ in range(n - 1)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*stage))
            cin = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The weighted 3x3 convs of a network's main path in the order the input meets them
    (stem first; 1x1 projection shortcuts left out), as ``(name, module)``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def _even_depth(depth: int, minimum: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < minimum or depth % 2:
        raise ValueError(f"depth: expected an even int >= {minimum} (2 + 2 x blocks), got {depth!r}")
    return (depth - 2) // 2


def plain_net(depth: int, width: int = 64, batch_norm: bool = True, num_classes: int = 10, **kw) -> StagedNet:
    """The deep PlainNet: conv(3, width) [+ BN] + ReLU, depth - 2 x (conv(width, width) [+ BN] + ReLU),
    global average pooling, fc; ``depth`` weighted layers, one resolution throughout.

    Raises:
        ValueError: ``depth`` not an even int >= 4.
    """
    return StagedNet("plain", (width,), (_even_depth(depth, 4),), batch_norm, num_classes, **kw)


def residual_net(depth: int, width: int = 64, batch_norm: bool = True, num_classes: int = 10, **kw) -> StagedNet:
    """:func:`plain_net` with identity shortcuts around every pair of convs: the stem and
    (depth - 2) / 2 BasicBlocks of ``width`` channels.

    Raises:
        ValueError: ``depth`` not an even int >= 4.
    """
    return StagedNet("residual", (width,), (_even_depth(depth, 4),), batch_norm, num_classes, **kw)


def cifar_resnet(depth: int, plain: bool = False, num_classes: int = 10, **kw) -> StagedNet:
    """He et al. 2016's CIFAR-10 networks (section 4.2): depth = 6n + 2 (20, 32, 44, 56,
    110), three stages of n blocks with 16, 32, 64 filters on 32x32, 16x16, 8x8 maps; the
    plain counterpart without shortcuts when ``plain``. ResNet-20: 0.27 M parameters.

    Raises:
        ValueError: ``depth`` not of the form 6n + 2.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}")
    n = (depth - 2) // 6
    return StagedNet("plain" if plain else "residual", (16, 32, 64), (n, n, n), True, num_classes, **kw)


def plain18(num_classes: int = 10, **kw) -> StagedNet:
    """ResNet-18 (CIFAR stem: 3x3 stride 1, no max-pool) without its shortcuts: He et al.'s
    plain 18-layer net, 64/128/256/512 filters, two blocks per stage."""
    return StagedNet("plain", (64, 128, 256, 512), (2, 2, 2, 2), True, num_classes, **kw)
