"""Synchronized BatchNorm statistics across processes for the fused training path.

Like torch.nn.SyncBatchNorm, this is a ``torch.autograd.Function`` (collectives cannot go
through an op schema): each rank reduces its conv tiles to local moments (count, mean, M2),
all ranks all-gather them and merge with Chan's formula; in backward they all-reduce
``sum(g)`` and ``sum(g * (y - mean))``. The kernels are any backend's launchers with the
``resconv.triton_kernels`` signatures. Where they include ``conv2d_dgrad``/``conv2d_wgrad``
the conv backward is theirs, with dReLU/dBN fused into the operand loads (the conv-output
gradient is never written); otherwise dy is written and ATen's conv backward runs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._conv_args import memory_format_of
from ._conv_backward import conv2d_backward
from .triton import centred_shift


def _all_gather_cat(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _coefficients(sum_g, sum_gy, invstd, bn_weight, count):
    gi = invstd if bn_weight is None else bn_weight.float() * invstd
    return gi, -gi * invstd * invstd * sum_gy / count, -gi * sum_g / count


class SyncConvBnTrain(torch.autograd.Function):
    """act(BN_global(conv2d(x, W) + b) + residual); running statistics updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                geom, eps, momentum, relu, allow_tf32, process_group, kernels, out_memory_format):
        K = geom.K
        y, cnt, pmean, pm2 = kernels.conv2d_fprop(
            x, weight, stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups,
            out_shape=geom.out_shape, shift=bias, allow_tf32=allow_tf32, out_memory_format=out_memory_format,
            stats=True,
        )
        n_local = y.numel() // K
        local = torch.zeros(2 * K + 1, dtype=torch.float32, device=x.device)
        if n_local > 0:
            mean_l, _, var_u_l, _, _ = kernels.bn_finalize(cnt, pmean, pm2, None, None, eps)
            local[:K] = mean_l
            local[K : 2 * K] = var_u_l * max(n_local - 1, 1)  # back to M2
            local[2 * K] = float(n_local)
        gathered = _all_gather_cat(local, process_group)  # [world, 2K + 1]
        counts = gathered[:, 2 * K].contiguous()
        mean, invstd, var_u, a, _ = kernels.bn_finalize(
            counts, gathered[:, :K].contiguous(), gathered[:, K : 2 * K].contiguous(), bn_weight, bn_bias, eps
        )
        if running_mean is not None or running_var is not None:
            kernels.update_running_stats_(running_mean, running_var, mean, var_u, momentum)
        out = kernels.scale_shift_act(y, a=a, b=centred_shift(bn_bias, mean), center=mean, residual=residual,
                                      relu=relu)
        ctx.geom, ctx.relu, ctx.group, ctx.kernels = geom, relu, process_group, kernels
        ctx.allow_tf32 = allow_tf32
        ctx.has_bias = bias is not None
        ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
        ctx.save_for_backward(x, weight, bn_weight, y, mean, invstd, out if relu else None, counts.sum())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bn_weight, y, mean, invstd, out, count = ctx.saved_tensors
        k, geom = ctx.kernels, ctx.geom
        fmt = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous() \
            else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        nx, nw, nb, ngamma, nbeta, nres = ctx.needs_input_grad[:6]
        # A namespace may hold the fused kernels but not want them yet (the cuda backend's switch).
        fused = hasattr(k, "conv2d_dgrad") and hasattr(k, "conv2d_wgrad") and \
            getattr(k, "use_fused_conv_backward", lambda: True)()
        want_g = fused and nres and ctx.relu  # g = grad_out * (out > 0), the residual's gradient
        g = torch.empty_like(grad_out) if want_g else None
        if want_g:
            sum_g, sum_gy = k.bn_backward_reduce(grad_out, out, y, mean, relu=ctx.relu, g_out=g)
        else:
            sum_g, sum_gy = k.bn_backward_reduce(grad_out, out, y, mean, relu=ctx.relu)
        # gamma's and beta's gradients are this rank's share (as nn.SyncBatchNorm's: DDP then
        # reduces them with every other parameter's); the input gradient needs the global sums.
        local_g, local_gy = sum_g, sum_gy
        packed = torch.cat([sum_g, sum_gy])
        dist.all_reduce(packed, group=ctx.group)
        K = sum_g.shape[0]
        sum_g, sum_gy = packed[:K], packed[K:]
        a, b, c = _coefficients(sum_g, sum_gy, invstd, bn_weight, count.clamp_min(1.0))
        conv = dict(stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups)
        if fused:
            src, mask = (g, None) if want_g else (grad_out, out if ctx.relu else None)
            pro = dict(relu_out=mask, y=y, a=a, b=b, c=c, mean=mean, allow_tf32=ctx.allow_tf32)
            gx = gw = gb = None
            if nx:
                gx = k.conv2d_dgrad(src, weight, input_shape=tuple(x.shape), out_memory_format=memory_format_of(x),
                                    **conv, **pro)
            if nw or (nb and ctx.has_bias):
                gw, gb = k.conv2d_wgrad(src, x, weight_shape=tuple(weight.shape), need_bias=nb and ctx.has_bias,
                                        weight_memory_format=memory_format_of(weight), **conv, **pro)
            g_res = (g if ctx.relu else grad_out) if nres else None
        else:
            dy, g_res = k.bn_backward_dy(grad_out, out, y, a=a, b=b, c=c, mean=mean, relu=ctx.relu,
                                         want_grad_residual=nres, dy_dtype=x.dtype)
            gx, gw, gb = conv2d_backward(dy, x, weight, geom.stride, geom.padding, geom.dilation, geom.groups,
                                         nx, nw, nb and ctx.has_bias)
        g_gamma = (local_gy * invstd).to(bn_weight.dtype) if ngamma else None
        g_beta = local_g.to(ctx.beta_dtype) if nbeta else None
        return (gx, gw if nw else None, gb, g_gamma, g_beta, g_res if nres else None) + (None,) * 10
