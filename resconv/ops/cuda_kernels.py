"""The CUDA C++ kernels behind the launcher signatures of ``resconv.triton_kernels``, so that
backend-neutral code (``resconv.ops.sync_bn.SyncConvBnTrain``) can take either as its
``kernels`` namespace. Each function loads the extension on first use (see
:func:`resconv.ops.cuda.ops`) and calls the matching ``torch.ops.resconv.cuda_*`` op."""
from __future__ import annotations

from typing import Optional

import torch

from .cuda import ops

Tensor = torch.Tensor


def conv2d_fprop(x: Tensor, weight: Tensor, *, stride, padding, dilation, groups: int, out_shape,
                 scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 relu: bool = False, allow_tf32: bool = False,
                 out_memory_format: torch.memory_format = torch.channels_last, stats: bool = False):
    """Fused fprop; with ``stats`` also ``(count [T], mean [T, K], m2 [T, K])`` fp32 partials,
    one per STATS_TILE_ROWS output pixels. See ``resconv.triton_kernels.conv2d_fprop``."""
    args = (x, weight, scale, shift, residual, list(stride), list(padding), list(dilation), groups, relu,
            allow_tf32, out_memory_format == torch.channels_last)
    res = ops().cuda_conv2d_fprop_stats(*args) if stats else ops().cuda_conv2d_fprop(*args)
    out = res[0] if stats else res
    if tuple(out.shape) != tuple(out_shape):
        raise ValueError(f"out_shape: expected {tuple(out.shape)} for these arguments, got {tuple(out_shape)}")
    return tuple(res) if stats else res


def bn_finalize(count: Tensor, mean: Tensor, m2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, ...]:
    """(mean, invstd, var_unbiased, a, b), each [K] fp32, from partial moments (Chan merge)."""
    return tuple(ops().cuda_bn_finalize(count, mean, m2, weight, bias, eps))


def update_running_stats_(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                          var_unbiased: Tensor, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place (either may be None)."""
    if running_mean is None and running_var is None:
        return
    ops().cuda_bn_update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)


def scale_shift_act(y: Tensor, *, a: Optional[Tensor] = None, b: Optional[Tensor] = None,
                    residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``act(y * a[k] + b[k] + residual)`` in y's dtype and layout."""
    return ops().cuda_scale_shift_act(y, a, b, residual, relu)


def bn_backward_reduce(grad_out: Tensor, out: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor], *,
                       relu: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(sum(g), sum(g * (y - mean)) or None without y), g = grad_out * (out > 0 if relu)."""
    sum_g, sum_gy = ops().cuda_bn_backward_reduce(grad_out, out if relu else None, y, mean, relu)
    return sum_g, (sum_gy if y is not None else None)


def bn_backward_dy(grad_out: Tensor, out: Optional[Tensor], y: Optional[Tensor], *, a: Tensor,
                   b: Optional[Tensor] = None, c: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                   relu: bool, want_grad_residual: bool, dy_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """(dy, grad_residual or None): dReLU + residual gradient + dBN input formula in one pass."""
    dy, gres = ops().cuda_bn_backward_dy(grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype)
    return dy, (gres if want_grad_residual else None)
