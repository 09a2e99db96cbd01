"""The convolution part of every backward: input gradient (dgrad) and filter/bias gradient
(wgrad), given the gradient ``dy`` that reaches the conv output.

Today this is ATen's ``convolution_backward`` (cuDNN on CUDA) for every backend: the README's
op table says so. Asymmetric padding ('same' with even kernels) is not expressible in ATen's
convolution, so the input is padded explicitly and the padding cut off the input gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def conv2d_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``conv2d(x, weight) + bias`` given ``dy``.

    Args:
        dy (Tensor[N, K, P, Q]), x (Tensor[N, C, H, W]), weight (Tensor[K, C/groups, R, S]);
        padding (top, bottom, left, right).
    Returns:
        (grad_input Tensor[N, C, H, W] | None, grad_weight Tensor[K, C/groups, R, S] | None,
        grad_bias Tensor[K] | None), in the dtypes of x, weight and weight.
    """
    if not (need_input or need_weight or need_bias):
        return None, None, None
    t, b, l, r = padding
    symmetric = t == b and l == r
    xin = x if symmetric else F.pad(x, (l, r, t, b))
    pad2 = [t, l] if symmetric else [0, 0]
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        dy, xin, weight, [weight.shape[0]] if need_bias else None,
        list(stride), pad2, list(dilation), False, [0, 0], groups,
        [need_input, need_weight, need_bias],
    )
    if need_input and not symmetric:
        gx = gx[:, :, t : t + x.shape[2], l : l + x.shape[3]]
    return (gx if need_input else None, gw if need_weight else None, gb if need_bias else None)
