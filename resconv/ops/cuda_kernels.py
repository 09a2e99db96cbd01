"""The CUDA C++ kernels behind the launcher signatures of ``resconv.triton_kernels``, so that
backend-neutral code (``resconv.ops.sync_bn.SyncConvBnTrain``) can take either as its
``kernels`` namespace. Each function loads the extension on first use (see
:func:`resconv.ops.cuda.ops`) and calls the matching ``torch.ops.resconv.cuda_*`` op.

``conv2d_dgrad`` / ``conv2d_wgrad`` are the CUDA C++ dgrad/wgrad with the fused dReLU/dBN
prologue; whether a backend-neutral caller uses them is the cuda backend's switch
(:func:`use_fused_conv_backward`, :func:`resconv.ops.cuda.conv_backward_impl`)."""
from __future__ import annotations

from typing import Optional

import torch

from .cuda import conv_backward_impl, ops

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
                    residual: Optional[Tensor] = None, relu: bool = False,
                    center: Optional[Tensor] = None) -> Tensor:
    """``act((y - center[k]) * a[k] + b[k] + residual)`` in y's dtype and layout.

    The C++ kernel has no centre yet: it is folded into the shift (``b - center * a``), which
    loses log2(|mean| / std) bits where the conv output has a large common offset (the
    Triton kernel subtracts it first).
    """
    if center is not None:
        if a is None or b is None:
            raise ValueError("center: needs a and b (the scale and shift it is applied with)")
        b = b - center * a
    return ops().cuda_scale_shift_act(y, a, b, residual, relu)


def bn_backward_reduce(grad_out: Tensor, out: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor], *,
                       relu: bool, g_out: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(sum(g), sum(g * (y - mean)) or None without y), g = grad_out * (out > 0 if relu).

    g_out (Tensor[N, K, P, Q] or None): if given, g is also written there (grad_out's shape
    and strides). Here that is a second pass (the C++ reduction does not write g).
    """
    if g_out is not None and (g_out.shape != grad_out.shape or g_out.stride() != grad_out.stride()):
        raise ValueError("g_out: expected a tensor of grad_out's shape and strides")
    sum_g, sum_gy = ops().cuda_bn_backward_reduce(grad_out, out if relu else None, y, mean, relu)
    if g_out is not None:
        ones = torch.ones(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
        g, _ = ops().cuda_bn_backward_dy(grad_out, out if relu else None, None, ones, None, None, None, relu, False,
                                         g_out.dtype)
        g_out.copy_(g)
    return sum_g, (sum_gy if y is not None else None)


def bn_backward_dy(grad_out: Tensor, out: Optional[Tensor], y: Optional[Tensor], *, a: Tensor,
                   b: Optional[Tensor] = None, c: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                   relu: bool, want_grad_residual: bool, dy_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """(dy, grad_residual or None): dReLU + residual gradient + dBN input formula in one pass."""
    dy, gres = ops().cuda_bn_backward_dy(grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype)
    return dy, (gres if want_grad_residual else None)



def use_fused_conv_backward() -> bool:
    """Whether backend-neutral callers (``SyncConvBnTrain``) should use :func:`conv2d_dgrad` /
    :func:`conv2d_wgrad` with the fused prologue: the cuda backend's switch
    (:func:`resconv.ops.cuda.conv_backward_impl`) says "cuda"."""
    return conv_backward_impl() == "cuda"


def conv2d_dgrad(dy: Tensor, weight: Tensor, *, input_shape, stride, padding, dilation, groups: int,
                 relu_out: Optional[Tensor] = None, y: Optional[Tensor] = None, a: Optional[Tensor] = None,
                 b: Optional[Tensor] = None, c: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                 allow_tf32: bool = False, out_memory_format: torch.memory_format = torch.channels_last) -> Tensor:
    """dx (Tensor[N, C, H, W] = input_shape) in weight's dtype and ``out_memory_format``; with
    ``a``, dy = a*where(relu_out > 0, dy, 0) + b*(y - mean) + c formed in the kernel's loads.
    dy, relu_out and y are cast to weight's dtype if they differ. See
    ``resconv.triton_kernels.conv2d_dgrad``."""
    cast = lambda t: t if t is None or t.dtype == weight.dtype else t.to(weight.dtype)  # noqa: E731
    return ops().cuda_conv2d_dgrad(cast(dy), weight, cast(relu_out), cast(y), a, b, c, mean, list(input_shape),
                                   list(stride), list(padding), list(dilation), groups,
                                   out_memory_format == torch.channels_last, allow_tf32)


def conv2d_wgrad(dy: Tensor, x: Tensor, *, weight_shape, stride, padding, dilation, groups: int,
                 need_bias: bool = False, relu_out: Optional[Tensor] = None, y: Optional[Tensor] = None,
                 a: Optional[Tensor] = None, b: Optional[Tensor] = None, c: Optional[Tensor] = None,
                 mean: Optional[Tensor] = None, allow_tf32: bool = False,
                 weight_memory_format: torch.memory_format = torch.contiguous_format,
                 split_k: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(dW Tensor[K, C/groups, R, S] = weight_shape in ``weight_memory_format``, db Tensor[K]
    or None), in x's dtype; split_k None chooses the split count. dy, relu_out and y are cast
    to x's dtype if they differ. See ``resconv.triton_kernels.conv2d_wgrad``."""
    cast = lambda t: t if t is None or t.dtype == x.dtype else t.to(x.dtype)  # noqa: E731
    gw, gb = ops().cuda_conv2d_wgrad(cast(dy), x, cast(relu_out), cast(y), a, b, c, mean, list(weight_shape),
                                     list(stride), list(padding), list(dilation), groups, need_bias,
                                     weight_memory_format == torch.channels_last, allow_tf32, split_k or 0)
    return gw, (gb if need_bias else None)
