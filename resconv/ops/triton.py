"""The Triton backend: its torch.library custom ops (schema and fake implementation), the
kernel adapter the shared autograd is written against, and the backend object.

Kernels (``resconv.triton_kernels``) are imported lazily, on first call, so that importing
resconv never compiles or decorates a kernel (and a CLI can still set TRITON_INTERPRET).

Ops (all in the ``resconv`` namespace; their autograd is :mod:`resconv.ops.autograd`'s):

* ``triton_conv2d_fprop``: ``act(scale * conv2d(x, W) + shift + residual)`` (eval path).
* ``triton_conv2d_bn_train``: training-mode conv + BatchNorm (batch statistics) + residual + ReLU,
  returning the batch statistics beside the output.

Both take the output's memory format as their last argument, ``channels_last`` (the caller
applies torch's rule for input and weight, :func:`resconv._conv_args.conv_memory_format`).
* ``triton_add_relu``: ``act(x + residual)``.
* ``triton_bn_update_running_stats_``: in-place running-statistics update (mutation in the
  schema; either buffer may be None).
* ``triton_bn_backward_reduce`` / ``triton_bn_backward_dy``: the dReLU/dBN kernels the
  backward formulas call (custom ops so that torch.compile can trace the backward).
* ``triton_conv2d_dgrad`` / ``triton_conv2d_wgrad`` (:mod:`resconv.ops.triton_conv_backward`):
  the conv part of every backward, with dReLU and dBN fused into their operand loads.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
from torch.library import custom_op

from .._conv_args import conv_out_shape, is_channels_last, memory_format_of
from . import autograd
from . import triton_conv_backward as conv_backward_ops
from ._shared import Geometry, Kernels, dense_like_first, empty_like_format
from .backend import KernelBackend

Tensor = torch.Tensor
SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tk():
    import resconv.triton_kernels as tk

    return tk


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# --------------------------------------------------------------------------------------
# fused conv forward (eval / inference)
# --------------------------------------------------------------------------------------
@custom_op("resconv::triton_conv2d_fprop", mutates_args=())
def conv2d_fprop(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    allow_tf32: bool,
    channels_last: bool,
) -> Tensor:
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
    return _tk().conv2d_fprop(
        x, weight, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups,
        out_shape=shape, scale=scale, shift=shift, residual=residual, relu=relu, allow_tf32=allow_tf32,
        out_memory_format=_fmt(channels_last),
    )


@conv2d_fprop.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32, channels_last):
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
    return empty_like_format(shape, x, _fmt(channels_last))


# --------------------------------------------------------------------------------------
# training-mode conv + BatchNorm (+ residual) (+ ReLU)
# --------------------------------------------------------------------------------------
@custom_op("resconv::triton_conv2d_bn_train", mutates_args=())
def conv2d_bn_train(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    eps: float,
    relu: bool,
    allow_tf32: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y, mean, invstd, var_unbiased): y = conv + bias as stored for backward."""
    out, y, mean, invstd, var_unbiased, _ = autograd.bn_train_forward(
        KERNELS, x, weight, bias, bn_weight, bn_bias, residual, Geometry.of(stride, padding, dilation, groups), eps,
        relu, allow_tf32, _fmt(channels_last),
    )
    return out, y, mean, invstd, var_unbiased


@conv2d_bn_train.register_fake
def _(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu, allow_tf32,
      channels_last):
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
    stat = x.new_empty((shape[1],), dtype=torch.float32)
    out = empty_like_format(shape, x, _fmt(channels_last))
    return out, torch.empty_like(out), stat, stat.clone(), stat.clone()


@custom_op("resconv::triton_bn_update_running_stats_", mutates_args=("running_mean", "running_var"))
def bn_update_running_stats_(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var_unbiased: Tensor,
    momentum: float,
) -> None:
    _tk().update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)


@bn_update_running_stats_.register_fake
def _(running_mean, running_var, mean, var_unbiased, momentum):
    return None


# --------------------------------------------------------------------------------------
# standalone residual add + ReLU
# --------------------------------------------------------------------------------------
@custom_op("resconv::triton_add_relu", mutates_args=())
def add_relu(x: Tensor, residual: Tensor, relu: bool) -> Tensor:
    return _tk().scale_shift_act(x, residual=residual, relu=relu)


@add_relu.register_fake
def _(x, residual, relu):
    return empty_like_format(x.shape, x, memory_format_of(x))


# --------------------------------------------------------------------------------------
# backward kernels as ops (traceable by torch.compile's autograd)
# --------------------------------------------------------------------------------------
@custom_op("resconv::triton_bn_backward_reduce", mutates_args=())
def bn_backward_reduce(
    grad_out: Tensor, out: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor], relu: bool, want_g: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(sum(g), sum(g * (y - mean)), g) per channel, g = grad_out * (out > 0); the second is
    zeros when y is None; mean None means 0; g itself is written (in out's layout) only with
    ``want_g``, else an empty tensor."""
    grad_out, out, y = dense_like_first(out if relu else y, grad_out, out, y)
    if y is not None and mean is None:
        mean = torch.zeros(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    g = torch.empty_like(grad_out) if want_g else None
    sum_g, sum_gy = _tk().bn_backward_reduce(grad_out, out, y, mean, relu=relu, g_out=g)
    return sum_g, (sum_gy if sum_gy is not None else torch.zeros_like(sum_g)), (g if want_g else grad_out.new_empty((0,)))


@bn_backward_reduce.register_fake
def _(grad_out, out, y, mean, relu, want_g):
    k = grad_out.shape[1]
    like = out if relu else (y if y is not None else grad_out)
    g = empty_like_format(grad_out.shape, grad_out, memory_format_of(like)) if want_g else grad_out.new_empty((0,))
    return grad_out.new_empty((k,), dtype=torch.float32), grad_out.new_empty((k,), dtype=torch.float32), g


@custom_op("resconv::triton_bn_backward_dy", mutates_args=())
def bn_backward_dy(
    grad_out: Tensor,
    out: Optional[Tensor],
    y: Optional[Tensor],
    a: Tensor,
    b: Optional[Tensor],
    c: Optional[Tensor],
    mean: Optional[Tensor],
    relu: bool,
    want_grad_residual: bool,
    dy_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(dy, grad_residual): dReLU + dBN input formula; grad_residual is empty unless asked for."""
    grad_out, out, y = dense_like_first(out if relu else y, grad_out, out, y)
    dy, gres = _tk().bn_backward_dy(
        grad_out, out, y, a=a, b=b, c=c, mean=mean, relu=relu,
        want_grad_residual=want_grad_residual, dy_dtype=dy_dtype,
    )
    return dy, (gres if gres is not None else grad_out.new_empty((0,)))


@bn_backward_dy.register_fake
def _(grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype):
    like = out if out is not None else (y if y is not None else grad_out)
    fmt = memory_format_of(like)
    dy = empty_like_format(like.shape, like, fmt, dtype=dy_dtype)
    gres = empty_like_format(like.shape, grad_out, fmt) if want_grad_residual else grad_out.new_empty((0,))
    return dy, gres


# --------------------------------------------------------------------------------------
# the kernel adapter and the backend
# --------------------------------------------------------------------------------------
class TritonKernels(Kernels):
    """The Triton kernels behind :class:`~resconv.ops._shared.Kernels`: the registered ops
    above for what autograd calls, the launchers for what runs inside an op."""

    name = "triton"

    def __init__(self, fused_conv_backward: bool = True):
        self.fused_conv_backward = fused_conv_backward

    def fprop(self, x, weight, scale, shift, residual, geom, relu, allow_tf32, out_format):
        return conv2d_fprop(x, weight, scale, shift, residual, *geom, relu, allow_tf32,
                            out_format == torch.channels_last)

    def bn_train(self, x, weight, bias, bn_weight, bn_bias, residual, geom, eps, relu, allow_tf32, out_format):
        return conv2d_bn_train(x, weight, bias, bn_weight, bn_bias, residual, *geom, eps, relu, allow_tf32,
                               out_format == torch.channels_last)

    def add_relu(self, x, residual, relu):
        return add_relu(x, residual, relu)

    def update_running_stats_(self, running_mean, running_var, mean, var_unbiased, momentum):
        if running_mean is not None or running_var is not None:
            bn_update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)

    def bn_backward_reduce(self, grad_out, out, y, mean, relu, want_g):
        sum_g, sum_gy, g = bn_backward_reduce(grad_out, out, y, mean, relu, want_g)
        return sum_g, sum_gy, (g if want_g else None)

    def bn_backward_dy(self, grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype):
        dy, gres = bn_backward_dy(grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype)
        return dy, (gres if want_grad_residual else None)

    def own_conv_backward(self, dy, x, weight, geom, need_input, need_weight, need_bias, allow_tf32, prologue):
        if prologue is not None:
            # dy formed once, in one elementwise pass, for both dgrad and wgrad: cheaper than
            # forming it in their operand loads, once per tap and tile (triton_kernels/conv_dgrad.py).
            p = prologue
            dy, _ = self.bn_backward_dy(dy, p.relu_out, p.y, p.a, p.b, p.c, p.mean, p.relu_out is not None, False,
                                        x.dtype)
        gx = gw = gb = None
        if need_input:
            gx = conv_backward_ops.conv2d_dgrad(dy, weight, None, None, None, None, None, None, list(x.shape),
                                                *geom, is_channels_last(x), allow_tf32)
        if need_weight or need_bias:
            gw, gb = conv_backward_ops.conv2d_wgrad(dy, x, None, None, None, None, None, None,
                                                    list(weight.shape), *geom, need_bias, is_channels_last(weight),
                                                    allow_tf32)
            gw = gw if need_weight else None
            gb = gb if need_bias else None
        return gx, gw, gb

    def fprop_stats(self, x, weight, bias, geom, allow_tf32, out_format):
        stride, padding, dilation, groups = geom
        return _tk().conv2d_fprop(
            x, weight, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups,
            out_shape=conv_out_shape(x.shape, weight.shape, stride, padding, dilation), shift=bias,
            allow_tf32=allow_tf32, out_memory_format=out_format, stats=True,
        )

    def bn_finalize(self, count, mean, m2, bn_weight, bn_bias, eps):
        return _tk().bn_finalize(count, mean, m2, bn_weight, bn_bias, eps)

    def scale_shift_act(self, y, a, b, center, residual, relu):
        return _tk().scale_shift_act(y, a=a, b=b, center=center, residual=residual, relu=relu)


KERNELS = TritonKernels()
autograd.register(KERNELS, fprop="resconv::triton_conv2d_fprop", bn_train="resconv::triton_conv2d_bn_train",
                  add_relu="resconv::triton_add_relu")


class TritonBackend(KernelBackend):
    """Runs resconv's ops with the Triton kernels (CUDA tensors of compute capability >= 8.0,
    or CPU tensors under Triton's interpreter), fp16/bf16/fp32."""

    name = "triton"

    def __init__(self, kernels: Kernels = KERNELS):
        # Do not import triton here: TRITON_INTERPRET must be set before triton is first
        # imported (its own library functions are decorated then), and a CLI may set it late.
        import importlib.util

        self.kernels = kernels
        self.cause: Optional[BaseException] = None
        if importlib.util.find_spec("triton") is None:
            self.cause = ModuleNotFoundError("No module named 'triton'")

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if self.cause is not None:
            return f"triton is not installed ({self.cause})"
        if dtype not in SERVED_DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        interpret = interpret_mode()
        if device.type == "cuda":
            if interpret:
                return "TRITON_INTERPRET=1 is set: the Triton kernels run on CPU tensors in this process"
            if not torch.cuda.is_available():
                return "no usable CUDA device (torch.cuda.is_available() is False)"
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"needs a GPU of compute capability 8.0 or newer, got {major}.x"
            return None
        if device.type == "cpu":
            if not interpret:
                return "needs a CUDA tensor (or TRITON_INTERPRET=1 set before the first call, for the CPU interpreter)"
            return interpreter_problem()
        return f"device type {device.type!r} is not supported"


def interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run our kernels here, or None.

    Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8's does not.
    Compiled kernels on a GPU are not affected.
    """
    import numpy
    import triton

    def major_minor(v: str) -> tuple[int, int]:
        parts = v.split(".")
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)

    if major_minor(triton.__version__) < (3, 8) and major_minor(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__}; "
            "use numpy<2.4 (or triton>=3.8) to run the Triton kernels on the CPU"
        )
    return None


def interpret_mode() -> bool:
    """The interpreter mode the kernels have (or will have, once imported)."""
    mod = sys.modules.get("resconv.triton_kernels._common")
    if mod is not None:
        return mod.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
