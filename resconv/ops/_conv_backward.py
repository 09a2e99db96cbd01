"""The convolution part of every backward: input gradient (dgrad) and filter/bias gradient
(wgrad), given the gradient ``dy`` that reaches the conv output.

Two implementations, chosen by the caller with ``impl``:

* ``"aten"`` (the default): ATen's ``convolution_backward`` (cuDNN on CUDA). Asymmetric
  padding ('same' with even kernels) is not expressible in ATen's convolution, so the input
  is padded explicitly and the padding cut off the input gradient.
* ``"triton"``: resconv's implicit-GEMM dgrad/wgrad kernels (``resconv::triton_conv2d_dgrad``
  / ``resconv::triton_conv2d_wgrad``), which can also form dy from a :class:`DyPrologue`
  while loading their operand tiles, so that dy is never written to memory.
* ``"cuda"``: the same in CUDA C++ (``resconv::cuda_conv2d_dgrad`` / ``resconv::cuda_conv2d_wgrad``,
  the extension ``resconv._C``, loaded or compiled on first use; CUDA tensors only).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .._conv_args import is_channels_last, memory_format_of

Tensor = torch.Tensor

IMPLS = ("aten", "triton", "cuda")


class DyPrologue(NamedTuple):
    """The conv-output gradient given implicitly, from the gradient ``g`` passed as ``dy``:

        dy = a[k] * where(relu_out > 0, g, 0) + b[k] * (y - mean[k]) + c[k]

    (dReLU and the BatchNorm input-gradient formula). ``relu_out`` None: no mask; ``y`` None:
    no ``b``/``c``/``mean`` terms. ``a``, ``b``, ``c``, ``mean``: Tensor[K] fp32;
    ``relu_out``, ``y``: Tensor[N, K, P, Q].
    """

    a: Tensor
    relu_out: Optional[Tensor] = None
    y: Optional[Tensor] = None
    b: Optional[Tensor] = None
    c: Optional[Tensor] = None
    mean: Optional[Tensor] = None

    def materialize(self, g: Tensor, dtype: torch.dtype) -> Tensor:
        """dy as a tensor of ``dtype`` (fp32 math, one rounding), for implementations
        without the fused prologue."""
        col = lambda v: v.float().view(1, -1, 1, 1)  # noqa: E731
        gf = g.float()
        if self.relu_out is not None:
            gf = torch.where(self.relu_out > 0, gf, torch.zeros((), dtype=gf.dtype, device=gf.device))
        dy = gf * col(self.a)
        if self.y is not None:
            dy = dy + col(self.b) * (self.y.float() - col(self.mean)) + col(self.c)
        return dy.to(dtype)


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
    *,
    impl: str = "aten",
    allow_tf32: Optional[bool] = None,
    prologue: Optional[DyPrologue] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``conv2d(x, weight) + bias`` given ``dy``.

    Args:
        dy (Tensor[N, K, P, Q]): the gradient at the conv output, or with ``prologue`` the
            gradient g it is formed from. x (Tensor[N, C, H, W]), weight (Tensor[K, C/groups, R, S]);
            padding (top, bottom, left, right).
        impl ("aten", "triton" or "cuda"): see the module docstring.
        allow_tf32 (bool or None): "triton" and "cuda": fp32 operands on TF32 tensor cores;
            None follows ``torch.backends.cudnn.allow_tf32`` ("aten" always follows it).
        prologue (DyPrologue or None): form dy from ``dy`` (fused into the kernels' loads
            with "triton" and "cuda"; materialised first with "aten"). With "cuda", ``dy``,
            ``relu_out`` and ``y`` are first cast to x's dtype if they differ (the kernels take
            one operand dtype).
    Returns:
        (grad_input Tensor[N, C, H, W] | None, grad_weight Tensor[K, C/groups, R, S] | None,
        grad_bias Tensor[K] | None), in the dtypes of x, weight and weight; grad_input in x's
        memory format.
    Raises:
        ValueError: an unknown ``impl``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if not (need_input or need_weight or need_bias):
        return None, None, None
    if impl != "aten":
        run = _triton_backward if impl == "triton" else _cuda_backward
        return run(dy, x, weight, stride, padding, dilation, groups, need_input, need_weight, need_bias,
                   torch.backends.cudnn.allow_tf32 if allow_tf32 is None else bool(allow_tf32), prologue)
    if prologue is not None:
        dy = prologue.materialize(dy, x.dtype)
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


def _triton_backward(dy, x, weight, stride, padding, dilation, groups, need_input, need_weight, need_bias,
                     allow_tf32: bool, prologue: Optional[DyPrologue]):
    from . import triton_conv_backward as ops

    p = prologue if prologue is not None else DyPrologue(None)  # type: ignore[arg-type]
    if p.relu_out is not None or p.y is not None:
        # The prologue reads g, relu_out and y with one set of strides.
        dy = dy.contiguous(memory_format=memory_format_of(p.relu_out if p.relu_out is not None else p.y))
    geom = (list(stride), list(padding), list(dilation), groups)
    gx = gw = gb = None
    if need_input:
        gx = ops.conv2d_dgrad(dy, weight, p.relu_out, p.y, p.a, p.b, p.c, p.mean, list(x.shape), *geom,
                              is_channels_last(x), allow_tf32)
    if need_weight or need_bias:
        gw, gb = ops.conv2d_wgrad(dy, x, p.relu_out, p.y, p.a, p.b, p.c, p.mean, list(weight.shape), *geom,
                                  need_bias, is_channels_last(weight), allow_tf32)
        gw = gw if need_weight else None
        gb = gb if need_bias else None
    return gx, gw, gb


def _cuda_backward(dy, x, weight, stride, padding, dilation, groups, need_input, need_weight, need_bias,
                   allow_tf32: bool, prologue: Optional[DyPrologue]):
    from .cuda import ops

    o = ops()
    p = prologue if prologue is not None else DyPrologue(None)  # type: ignore[arg-type]
    dt = x.dtype
    as_dt = lambda t: t if t is None or t.dtype == dt else t.to(dt)  # noqa: E731
    dy, relu_out, y = as_dt(dy), as_dt(p.relu_out), as_dt(p.y)
    geom = (list(stride), list(padding), list(dilation), groups)
    gx = gw = gb = None
    if need_input:
        gx = o.cuda_conv2d_dgrad(dy, weight, relu_out, y, p.a, p.b, p.c, p.mean, list(x.shape), *geom,
                                 is_channels_last(x), allow_tf32)
    if need_weight or need_bias:
        gw, gb = o.cuda_conv2d_wgrad(dy, x, relu_out, y, p.a, p.b, p.c, p.mean, list(weight.shape), *geom,
                                     need_bias, is_channels_last(weight), allow_tf32)
        gw = gw if need_weight else None
        gb = gb if need_bias else None
    return gx, gw, gb
