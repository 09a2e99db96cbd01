"""The Triton conv backward as torch.library custom ops (schema + fake implementation), so
that torch.compile's autograd can trace the backward of the Triton backend's ops (an adapter
of :mod:`resconv.ops.triton`, which calls them from ``TritonKernels.conv_backward``).

* ``resconv::triton_conv2d_dgrad``: input gradient.
* ``resconv::triton_conv2d_wgrad``: weight gradient (and bias gradient, from the same pass).

Both take the gradient at the conv output either as a tensor ``grad`` (``a`` None) or through
the fused dReLU/dBN prologue, ``dy = a[k]*where(relu_out <= 0, 0, grad) + b[k]*(y - mean[k]) + c[k]``,
formed while the kernels load their operand tiles (see ``resconv.triton_kernels.conv_dgrad``).
They have no autograd of their own (no double backward). Kernels are imported on first call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.library import custom_op

Tensor = torch.Tensor


def _tk():
    import resconv.triton_kernels as tk

    return tk


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@custom_op("resconv::triton_conv2d_dgrad", mutates_args=())
def conv2d_dgrad(
    grad: Tensor,
    weight: Tensor,
    relu_out: Optional[Tensor],
    y: Optional[Tensor],
    a: Optional[Tensor],
    b: Optional[Tensor],
    c: Optional[Tensor],
    mean: Optional[Tensor],
    input_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    channels_last: bool,
    allow_tf32: bool,
) -> Tensor:
    """dx (Tensor[N, C, H, W] = input_size) in weight's dtype, NHWC if ``channels_last``."""
    return _tk().conv2d_dgrad(
        grad, weight, input_shape=tuple(input_size), stride=tuple(stride), padding=tuple(padding),
        dilation=tuple(dilation), groups=groups, relu_out=relu_out, y=y, a=a, b=b, c=c, mean=mean,
        allow_tf32=allow_tf32, out_memory_format=_fmt(channels_last),
    )


@conv2d_dgrad.register_fake
def _(grad, weight, relu_out, y, a, b, c, mean, input_size, stride, padding, dilation, groups, channels_last,
      allow_tf32):
    return torch.empty(tuple(input_size), dtype=weight.dtype, device=grad.device, memory_format=_fmt(channels_last))


@custom_op("resconv::triton_conv2d_wgrad", mutates_args=())
def conv2d_wgrad(
    grad: Tensor,
    x: Tensor,
    relu_out: Optional[Tensor],
    y: Optional[Tensor],
    a: Optional[Tensor],
    b: Optional[Tensor],
    c: Optional[Tensor],
    mean: Optional[Tensor],
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    need_bias: bool,
    weight_channels_last: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    """(dW Tensor[K, C/groups, R, S] = weight_size, db Tensor[K], or an empty tensor without
    ``need_bias``), in x's dtype; dW is NHWC-ordered (K R S C) if ``weight_channels_last``."""
    gw, gb = _tk().conv2d_wgrad(
        grad, x, weight_shape=tuple(weight_size), stride=tuple(stride), padding=tuple(padding),
        dilation=tuple(dilation), groups=groups, need_bias=need_bias, relu_out=relu_out, y=y, a=a, b=b, c=c,
        mean=mean, allow_tf32=allow_tf32, weight_memory_format=_fmt(weight_channels_last),
    )
    return gw, (gb if gb is not None else x.new_empty((0,)))


@conv2d_wgrad.register_fake
def _(grad, x, relu_out, y, a, b, c, mean, weight_size, stride, padding, dilation, groups, need_bias,
      weight_channels_last, allow_tf32):
    gw = torch.empty(tuple(weight_size), dtype=x.dtype, device=x.device, memory_format=_fmt(weight_channels_last))
    gb = x.new_empty((weight_size[0],) if need_bias else (0,))
    return gw, gb
