"""The Triton backend's torch.library custom ops: schema, fake (meta) implementation and
autograd for each. Kernels are imported lazily, on first call, so that importing resconv
never compiles or decorates a kernel.

Ops (all in the ``resconv`` namespace):

* ``triton_conv2d_fprop``: ``act(scale * conv2d(x, W) + shift + residual)`` (eval path).
* ``triton_conv2d_bn_train``: training-mode conv + BatchNorm (batch statistics) + residual + ReLU,
  returning the batch statistics beside the output.
* ``triton_add_relu``: ``act(x + residual)``.
* ``triton_bn_update_running_stats_``: in-place running-statistics update (mutation in the schema).
* ``triton_bn_backward_reduce`` / ``triton_bn_backward_dy``: the dReLU/dBN kernels the
  backward formulas call (custom ops so that torch.compile can trace the backward).

The conv part of every backward is resconv's Triton dgrad/wgrad (``resconv.ops.triton_conv_backward``),
with dReLU and dBN fused into their operand loads: the conv-output gradient is never written.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.library import custom_op

from .._conv_args import memory_format_of
from ._conv_backward import DyPrologue, conv2d_backward

Tensor = torch.Tensor


def _tk():
    from .. import triton_kernels

    return triton_kernels


def out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    N, _, H, W = x.shape
    K, _, R, S = weight.shape
    P = (H + padding[0] + padding[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + padding[2] + padding[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return (N, K, P, Q)


def _empty_out(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


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
) -> Tensor:
    shape = out_shape(x, weight, stride, padding, dilation)
    return _tk().conv2d_fprop(
        x, weight, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups,
        out_shape=shape, scale=scale, shift=shift, residual=residual, relu=relu, allow_tf32=allow_tf32,
        out_memory_format=memory_format_of(x),
    )


@conv2d_fprop.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32):
    return _empty_out(x, out_shape(x, weight, stride, padding, dilation))


def _fprop_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32 = inputs
    ctx.geom = (tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.relu = relu
    ctx.allow_tf32 = allow_tf32
    ctx.has = (scale is not None, shift is not None, residual is not None)
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _fprop_backward(ctx, grad_out):
    x, weight, scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geom
    nx, nw, nscale, nshift, nres = ctx.needs_input_grad[:5]
    relu = ctx.relu
    if relu:
        (grad_out,) = _dense_like_first(out, grad_out)
    y = None
    if nscale:  # d(scale) = sum(g * conv(x, W)): recompute the raw conv rather than keep it
        y = conv2d_fprop(x, weight, None, None, None, stride, padding, dilation, groups, False, ctx.allow_tf32)
    # g = grad_out * (out > 0) is written only where it is an output (the residual's
    # gradient); otherwise the conv kernels apply the ReLU mask while loading grad_out.
    want_g = nres and relu
    sum_g = sum_gy = g = None
    if nshift or nscale:
        sum_g, sum_gy, g = bn_backward_reduce(grad_out, out, y, None, relu, want_g)
    elif want_g:
        ones = torch.ones(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
        g, _ = bn_backward_dy(grad_out, out, None, ones, None, None, None, True, False, grad_out.dtype)
    src, mask = (g, None) if want_g else (grad_out, out if relu else None)
    prologue = None
    if scale is not None or mask is not None:  # dy = scale * g, formed in the kernels' prologue
        a = scale.float() if scale is not None else torch.ones(grad_out.shape[1], device=grad_out.device)
        prologue = DyPrologue(a, mask)
    gx, gw, _ = conv2d_backward(src, x, weight, stride, padding, dilation, groups, nx, nw, False,
                                impl="triton", allow_tf32=ctx.allow_tf32, prologue=prologue)
    g_res = (g if relu else grad_out) if nres else None
    if g_res is not None and g_res.dtype != x.dtype:
        g_res = g_res.to(x.dtype)
    g_scale = sum_gy.to(scale.dtype) if nscale else None
    g_shift = sum_g.to(grad_out.dtype if scale is None else scale.dtype) if nshift else None
    return gx, gw, g_scale, g_shift, g_res, None, None, None, None, None, None


conv2d_fprop.register_autograd(_fprop_backward, setup_context=_fprop_setup)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y, mean, invstd, var_unbiased): y = conv + bias as stored for backward."""
    tk = _tk()
    shape = out_shape(x, weight, stride, padding, dilation)
    y, cnt, pmean, pm2 = tk.conv2d_fprop(
        x, weight, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups,
        out_shape=shape, shift=bias, allow_tf32=allow_tf32, out_memory_format=memory_format_of(x), stats=True,
    )
    mean, invstd, var_unbiased, a, _ = tk.bn_finalize(cnt, pmean, pm2, bn_weight, bn_bias, eps)
    out = tk.scale_shift_act(y, a=a, b=centred_shift(bn_bias, mean), center=mean, residual=residual, relu=relu)
    return out, y, mean, invstd, var_unbiased


def centred_shift(bn_bias: Optional[Tensor], like: Tensor) -> Tensor:
    """beta (Tensor[K]) as the fp32 shift of the centred apply ``(y - mean) * a + beta``
    (zeros like ``like`` without affine); shared with the synchronized path."""
    return torch.zeros_like(like) if bn_bias is None else bn_bias.float()


@conv2d_bn_train.register_fake
def _(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu, allow_tf32):
    shape = out_shape(x, weight, stride, padding, dilation)
    stat = x.new_empty((shape[1],), dtype=torch.float32)
    return _empty_out(x, shape), _empty_out(x, shape), stat, stat.clone(), stat.clone()


def _train_setup(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu, allow_tf32 = inputs
    out, y, mean, invstd, _ = output
    ctx.geom = (tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.relu = relu
    ctx.allow_tf32 = allow_tf32
    ctx.dtypes = (
        None if bias is None else bias.dtype,
        None if bn_weight is None else bn_weight.dtype,
        None if bn_bias is None else bn_bias.dtype,
    )
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, weight, bn_weight, y, mean, invstd, out if relu else None)


def bn_input_grad_coefficients(
    sum_g: Tensor, sum_gy: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], count: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of ``dy = a*g + b*(y - mean) + c``, the BatchNorm input gradient
    ``gamma*invstd*(g - mean(g) - xhat*mean(g*xhat))`` with ``xhat = (y - mean)*invstd``."""
    gi = invstd if bn_weight is None else bn_weight.float() * invstd
    return gi, -gi * invstd * invstd * sum_gy / count, -gi * sum_g / count


def _train_backward(ctx, grad_out, _gy, _gmean, _ginvstd, _gvar):
    x, weight, bn_weight, y, mean, invstd, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geom
    nx, nw, nb, ngamma, nbeta, nres = ctx.needs_input_grad[:6]
    relu = ctx.relu
    (grad_out,) = _dense_like_first(out if relu else y, grad_out)  # once, for every pass below
    count = float(y.numel() // y.shape[1]) if y.numel() else 1.0
    # One pass over (grad_out, out, y) for the dBN sums; it also writes g = grad_out * (out > 0)
    # when g is an output (the residual's gradient). The conv-output gradient
    # dy = a*g + b*(y - mean) + c is never written: dgrad and wgrad form it while loading.
    want_g = nres and relu
    sum_g, sum_gy, g = bn_backward_reduce(grad_out, out, y, mean, relu, want_g)
    a, b, c = bn_input_grad_coefficients(sum_g, sum_gy, invstd, bn_weight, count)
    src, mask = (g, None) if want_g else (grad_out, out if relu else None)
    gx, gw, gb = conv2d_backward(src, x, weight, stride, padding, dilation, groups, nx, nw, nb,
                                 impl="triton", allow_tf32=ctx.allow_tf32, prologue=DyPrologue(a, mask, y, b, c, mean))
    bias_dt, gamma_dt, beta_dt = ctx.dtypes
    g_gamma = (sum_gy * invstd).to(gamma_dt) if ngamma else None
    g_beta = sum_g.to(beta_dt) if nbeta else None
    if gb is not None:
        gb = gb.to(bias_dt)
    g_res = (g if relu else grad_out) if nres else None
    return gx, gw, gb, g_gamma, g_beta, g_res, None, None, None, None, None, None, None


conv2d_bn_train.register_autograd(_train_backward, setup_context=_train_setup)


@custom_op("resconv::triton_bn_update_running_stats_", mutates_args=("running_mean", "running_var"))
def bn_update_running_stats_(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var_unbiased: Tensor, momentum: float
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
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _add_setup(ctx, inputs, output):
    ctx.relu = inputs[2]
    ctx.save_for_backward(output if ctx.relu else None)


def _add_backward(ctx, grad_out):
    (out,) = ctx.saved_tensors
    if not ctx.relu:
        return grad_out, grad_out, None
    a = torch.ones(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    g, _ = bn_backward_dy(grad_out, out, None, a, None, None, None, True, False, out.dtype)
    return g, g, None


add_relu.register_autograd(_add_backward, setup_context=_add_setup)


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
    grad_out, out, y = _dense_like_first(out if relu else y, grad_out, out, y)
    if y is not None and mean is None:
        mean = torch.zeros(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    g = torch.empty_like(grad_out) if want_g else None
    sum_g, sum_gy = _tk().bn_backward_reduce(grad_out, out, y, mean, relu=relu, g_out=g)
    return sum_g, (sum_gy if sum_gy is not None else torch.zeros_like(sum_g)), (g if want_g else grad_out.new_empty((0,)))


@bn_backward_reduce.register_fake
def _(grad_out, out, y, mean, relu, want_g):
    k = grad_out.shape[1]
    like = out if relu else (y if y is not None else grad_out)
    g = (
        torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=memory_format_of(like))
        if want_g
        else grad_out.new_empty((0,))
    )
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
    grad_out, out, y = _dense_like_first(out if relu else y, grad_out, out, y)
    dy, gres = _tk().bn_backward_dy(
        grad_out, out, y, a=a, b=b, c=c, mean=mean, relu=relu,
        want_grad_residual=want_grad_residual, dy_dtype=dy_dtype,
    )
    return dy, (gres if gres is not None else grad_out.new_empty((0,)))


@bn_backward_dy.register_fake
def _(grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype):
    like = out if out is not None else (y if y is not None else grad_out)
    fmt = memory_format_of(like)
    dy = torch.empty(like.shape, dtype=dy_dtype, device=like.device, memory_format=fmt)
    gres = (
        torch.empty(like.shape, dtype=grad_out.dtype, device=like.device, memory_format=fmt)
        if want_grad_residual
        else grad_out.new_empty((0,))
    )
    return dy, gres


def _dense_like_first(like: Optional[Tensor], grad_out: Tensor, *others: Optional[Tensor]):
    """Incoming gradients can have any strides (even expanded ones): make the gradient dense
    in the layout of the saved forward tensor it is combined with."""
    fmt = memory_format_of(like if like is not None else grad_out)
    grad_out = grad_out.contiguous(memory_format=fmt)
    return (grad_out, *others)
