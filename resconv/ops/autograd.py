"""Every op's autograd and training forward, written once against a backend's :class:`Kernels`.

* :func:`register` gives a backend's three user-facing ops their autograd: the fused conv
  (eval path), conv + BatchNorm with batch statistics (training path), add + ReLU.
* :func:`bn_train_forward` / :func:`bn_train_backward`: the training path's forward (conv
  with statistics partials, Chan merge, centred apply) and backward (dReLU/dBN reductions,
  the input-gradient coefficients, the conv backward with its dReLU/dBN prologue), with an
  optional process group: the synchronized statistics of :class:`SyncConvBnTrain` are the
  same code with the moments all-gathered and the sums all-reduced.

The conv-output gradient is never written where the backend's conv backward takes a
:class:`DyPrologue` (``Kernels.fused_conv_backward``); otherwise the kernels materialise it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._conv_args import memory_format_of
from ._shared import (
    DyPrologue,
    Geometry,
    Kernels,
    bn_input_grad_coefficients,
    centred_shift,
    dense_like_first,
    ones_per_channel,
)

Tensor = torch.Tensor

# Inputs every op of a family shares, in schema order (a backend's schema may append more,
# e.g. the cuda ops' ``channels_last``; they get no gradient).
FPROP_INPUTS = 11  # x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32
# x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu, allow_tf32
TRAIN_INPUTS = 13


def register(kernels: Kernels, *, fprop: str, bn_train: str, add_relu: str) -> None:
    """Register the autograd of a backend's ops (qualified names), computed with ``kernels``."""
    torch.library.register_autograd(fprop, functools.partial(_fprop_backward, kernels), setup_context=_fprop_setup)
    torch.library.register_autograd(bn_train, functools.partial(_train_backward, kernels), setup_context=_train_setup)
    torch.library.register_autograd(add_relu, functools.partial(_add_backward, kernels), setup_context=_add_setup)


# ------------------------------------------------------------------------------------------
# fused conv (eval path): out = act(scale * conv2d(x, W) + shift + residual)
# ------------------------------------------------------------------------------------------
def _fprop_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32 = inputs[:FPROP_INPUTS]
    ctx.geom = Geometry.of(stride, padding, dilation, groups)
    ctx.relu, ctx.allow_tf32 = relu, allow_tf32
    ctx.out_format = memory_format_of(output)
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _fprop_backward(k: Kernels, ctx, grad_out):
    """Gradients of x, W, scale, shift and residual."""
    x, weight, scale, out = ctx.saved_tensors
    nx, nw, nscale, nshift, nres = ctx.needs_input_grad[:5]
    relu = ctx.relu
    if relu:
        (grad_out,) = dense_like_first(out, grad_out)
    y = None
    if nscale:  # d(scale) = sum(g * conv(x, W)): recompute the raw conv rather than keep it
        y = k.fprop(x, weight, None, None, None, ctx.geom, False, ctx.allow_tf32, ctx.out_format)
    # g = grad_out * (out > 0) is written only where it is an output (the residual's
    # gradient); otherwise the conv backward applies the ReLU mask while loading grad_out.
    want_g = nres and relu
    sum_g = sum_gy = g = None
    if nshift or nscale:
        sum_g, sum_gy, g = k.bn_backward_reduce(grad_out, out, y, None, relu, want_g)
    elif want_g:
        g, _ = k.bn_backward_dy(grad_out, out, None, ones_per_channel(grad_out), None, None, None, True, False,
                                grad_out.dtype)
    src, mask = (g, None) if want_g else (grad_out, out if relu else None)
    prologue = None
    if scale is not None or mask is not None:  # dy = scale * g
        prologue = DyPrologue(scale.float() if scale is not None else ones_per_channel(grad_out), mask)
    gx, gw, _ = k.conv_backward(src, x, weight, ctx.geom, nx, nw, False, ctx.allow_tf32, prologue)
    g_res = (g if relu else grad_out) if nres else None
    if g_res is not None and g_res.dtype != x.dtype:
        g_res = g_res.to(x.dtype)
    g_scale = sum_gy.to(scale.dtype) if nscale else None
    g_shift = sum_g.to(grad_out.dtype if scale is None else scale.dtype) if nshift else None
    return (gx, gw, g_scale, g_shift, g_res) + (None,) * (ctx.n_inputs - 5)


# ------------------------------------------------------------------------------------------
# training path: act(BN_batch(conv2d(x, W) + b) + residual)
# ------------------------------------------------------------------------------------------
def bn_train_forward(k: Kernels, x, weight, bias, bn_weight, bn_bias, residual, geom: Geometry, eps: float,
                     relu: bool, allow_tf32: bool, out_format: torch.memory_format, process_group=None):
    """(out, y, mean, invstd, var_unbiased, count): conv + bias with per-tile statistics, the
    partials merged with Chan's formula (over every rank of ``process_group`` when given), the
    centred apply ``(y - mean) * gamma * invstd + beta`` (+ residual, ReLU). y is conv + bias as
    stored for backward; count the values per channel (all ranks), a float."""
    y, cnt, pmean, pm2 = k.fprop_stats(x, weight, bias, geom, allow_tf32, out_format)
    K = y.shape[1]
    n_local = y.numel() // K if K else 0
    if process_group is None:
        mean, invstd, var_u, a, _ = k.bn_finalize(cnt, pmean, pm2, bn_weight, bn_bias, eps)
        count = float(n_local)
    else:
        import torch.distributed as dist

        local = torch.zeros(2 * K + 1, dtype=torch.float32, device=x.device)
        if n_local > 0:
            mean_l, _, var_u_l, _, _ = k.bn_finalize(cnt, pmean, pm2, None, None, eps)
            local[:K] = mean_l
            local[K : 2 * K] = var_u_l * max(n_local - 1, 1)  # back to M2
            local[2 * K] = float(n_local)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(parts, local, group=process_group)
        gathered = torch.stack(parts)  # [world, 2K + 1]: (mean, M2, count) per rank
        counts = gathered[:, 2 * K].contiguous()
        mean, invstd, var_u, a, _ = k.bn_finalize(
            counts, gathered[:, :K].contiguous(), gathered[:, K : 2 * K].contiguous(), bn_weight, bn_bias, eps
        )
        count = float(counts.sum().item())
    out = k.scale_shift_act(y, a, centred_shift(bn_bias, mean), mean, residual, relu)
    return out, y, mean, invstd, var_u, count


def bn_train_backward(k: Kernels, grad_out, x, weight, bn_weight, y, mean, invstd, out, geom: Geometry, relu: bool,
                      allow_tf32: bool, count, needs, process_group=None):
    """(grad x, grad W, grad bias, grad gamma, grad beta, grad residual), None where not needed.

    ``out`` is the saved output (used for the ReLU mask; None without ReLU); ``count`` the
    values per channel over every rank. With ``process_group``, the dBN sums are all-reduced
    for the input gradient, while gamma's and beta's gradients stay this rank's share (as
    nn.SyncBatchNorm's: DDP then reduces them with every other parameter's).
    """
    nx, nw, nb, ngamma, nbeta, nres = needs
    (grad_out,) = dense_like_first(out if relu else y, grad_out)  # once, for every pass below
    # One pass over (grad_out, out, y) for the dBN sums; it also writes g = grad_out * (out > 0)
    # when g is an output (the residual's gradient).
    want_g = nres and relu
    sum_g, sum_gy, g = k.bn_backward_reduce(grad_out, out, y, mean, relu, want_g)
    local_g, local_gy = sum_g, sum_gy
    if process_group is not None:
        import torch.distributed as dist

        packed = torch.cat([sum_g, sum_gy])
        dist.all_reduce(packed, group=process_group)
        sum_g, sum_gy = packed[: sum_g.shape[0]], packed[sum_g.shape[0] :]
    a, b, c = bn_input_grad_coefficients(sum_g, sum_gy, invstd, bn_weight, count)
    src, mask = (g, None) if want_g else (grad_out, out if relu else None)
    gx, gw, gb = k.conv_backward(src, x, weight, geom, nx, nw, nb, allow_tf32, DyPrologue(a, mask, y, b, c, mean))
    g_gamma = local_gy * invstd if ngamma else None
    g_beta = local_g if nbeta else None
    g_res = (g if relu else grad_out) if nres else None
    return gx, gw, gb, g_gamma, g_beta, g_res


def _train_setup(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu, allow_tf32 = \
        inputs[:TRAIN_INPUTS]
    out, y, mean, invstd, _ = output
    ctx.geom = Geometry.of(stride, padding, dilation, groups)
    ctx.relu, ctx.allow_tf32 = relu, allow_tf32
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, weight, bn_weight, y, mean, invstd, out if relu else None)


def _train_backward(k: Kernels, ctx, grad_out, _gy, _gmean, _ginvstd, _gvar):
    """Gradients of x, W, bias, gamma, beta and residual through BN with batch statistics."""
    x, weight, bn_weight, y, mean, invstd, out = ctx.saved_tensors
    count = float(y.numel() // y.shape[1]) if y.numel() else 1.0
    gx, gw, gb, g_gamma, g_beta, g_res = bn_train_backward(
        k, grad_out, x, weight, bn_weight, y, mean, invstd, out, ctx.geom, ctx.relu, ctx.allow_tf32, count,
        ctx.needs_input_grad[:6],
    )
    return (gx, gw) + _cast((gb, g_gamma, g_beta), ctx.dtypes) + (_cast_to(g_res, x.dtype),) + \
        (None,) * (ctx.n_inputs - 6)


def _cast_to(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _cast(ts, dtypes) -> tuple:
    return tuple(_cast_to(t, dt) for t, dt in zip(ts, dtypes))


class SyncConvBnTrain(torch.autograd.Function):
    """The training path with statistics synchronized over a ``torch.distributed`` group:
    :func:`bn_train_forward` / :func:`bn_train_backward` with the group, running statistics
    updated in place. A ``torch.autograd.Function`` (collectives cannot go through an op
    schema), like torch.nn.SyncBatchNorm.

    ``apply(x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var, geom,
    eps, momentum, relu, allow_tf32, process_group, kernels, out_format)`` with ``geom`` a
    :class:`resconv._conv_args.ConvGeometry` (or anything with stride/padding/dilation/groups)
    and ``kernels`` a :class:`Kernels`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                geom, eps, momentum, relu, allow_tf32, process_group, kernels, out_format):
        g = Geometry.of(geom.stride, geom.padding, geom.dilation, geom.groups)
        out, y, mean, invstd, var_u, count = bn_train_forward(
            kernels, x, weight, bias, bn_weight, bn_bias, residual, g, eps, relu, allow_tf32, out_format,
            process_group,
        )
        kernels.update_running_stats_(running_mean, running_var, mean, var_u, momentum)
        ctx.geom, ctx.relu, ctx.group, ctx.kernels = g, relu, process_group, kernels
        ctx.allow_tf32, ctx.count = allow_tf32, max(count, 1.0)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))
        ctx.save_for_backward(x, weight, bn_weight, y, mean, invstd, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bn_weight, y, mean, invstd, out = ctx.saved_tensors
        gx, gw, gb, g_gamma, g_beta, g_res = bn_train_backward(
            ctx.kernels, grad_out, x, weight, bn_weight, y, mean, invstd, out, ctx.geom, ctx.relu, ctx.allow_tf32,
            ctx.count, ctx.needs_input_grad[:6], ctx.group,
        )
        return (gx, gw) + _cast((gb, g_gamma, g_beta), ctx.dtypes) + (g_res,) + (None,) * 10


# ------------------------------------------------------------------------------------------
# add + ReLU
# ------------------------------------------------------------------------------------------
def _add_setup(ctx, inputs, output):
    ctx.relu = inputs[2]
    ctx.save_for_backward(output if ctx.relu else None)


def _add_backward(k: Kernels, ctx, grad_out):
    (out,) = ctx.saved_tensors
    if not ctx.relu:
        return grad_out, grad_out, None
    g, _ = k.bn_backward_dy(grad_out, out, None, ones_per_channel(grad_out), None, None, None, True, False, out.dtype)
    return g, g, None
