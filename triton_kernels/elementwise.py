"""Per-channel elementwise kernels over [N, K, P, Q] tensors (NCHW- or NHWC-dense):

* ``scale_shift_act``: ``out = act((y - center[k]) * a[k] + b[k] + residual)`` — the BatchNorm
  apply of training mode (centre = batch mean, subtracted first so that a large common offset
  cancels exactly instead of through ``a*y + (beta - mean*a)``) and, with no ``a``/``b``, the
  standalone residual add + ReLU.
* ``bn_backward_dy``: ``g = grad_out * (out > 0)``; ``dy = a[k] * g + b[k] * (y - mean[k]) + c[k]``,
  and ``grad_residual = g``: dReLU, the residual gradient and the dBN input-gradient
  formula in one pass.

All arithmetic is fp32; each output is rounded once. Offsets are 64-bit. A program works on a
2-D tile (see ``_tile``), never dividing per element to find a channel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, new_empty, device_function

# Elements per program: a [BLOCK_R, BLOCK_C] tile of the tensor seen as rows x contiguous
# columns (NHWC: pixels x channels; NCHW: (n, k) planes x pixels), so that a program finds
# each element's channel without a division per element: NHWC, the column; NCHW, once per row.
_TILE = 1024 if INTERPRET else 4096
_WARPS = 8


def _tile_shape(cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for rows of ``cols`` contiguous elements."""
    bc = min(triton.next_power_of_2(max(cols, 1)), 256)
    return max(1, _TILE // bc), bc


@device_function
def _tile(NROWS, NCOLS, K, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(offsets, mask, channel) of this program's tile; NHWC: [pixels, K]; NCHW: [N*K, pixels]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs = rows[:, None] * NCOLS + cols[None, :]
    mask = (rows < NROWS)[:, None] & (cols < NCOLS)[None, :]
    if CHANNELS_LAST:
        k = cols[None, :]
    else:
        k = (rows % K).to(tl.int32)[:, None]
    return offs, mask, k


@triton.jit
def _scale_shift_act_kernel(
    y_ptr,  # [N, K, P, Q] dense (NCHW or NHWC), any float dtype
    res_ptr,  # like y (HAS_RES)
    out_ptr,  # like y
    a_ptr,  # [K] fp32 (HAS_AFFINE)
    b_ptr,  # [K] fp32 (HAS_AFFINE)
    c_ptr,  # [K] fp32 centre (HAS_CENTER)
    NROWS, NCOLS, K,
    HAS_AFFINE: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, k = _tile(NROWS, NCOLS, K, BLOCK_R, BLOCK_C, CHANNELS_LAST)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_AFFINE:
        km = k < K
        if HAS_CENTER:
            v = v - tl.load(c_ptr + k, mask=km, other=0.0)
        v = v * tl.load(a_ptr + k, mask=km, other=1.0) + tl.load(b_ptr + k, mask=km, other=0.0)
    if HAS_RES:
        v = v + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN passes through, as in torch.relu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_backward_dy_kernel(
    gout_ptr,  # [N, K, P, Q] incoming gradient
    out_ptr,  # [N, K, P, Q] forward output (RELU: its sign is the ReLU mask)
    y_ptr,  # [N, K, P, Q] pre-BN conv output (HAS_Y)
    dy_ptr,  # [N, K, P, Q] gradient w.r.t. y (output)
    gres_ptr,  # [N, K, P, Q] gradient w.r.t. the residual (output, WRITE_GRES)
    a_ptr, b_ptr, c_ptr, mean_ptr,  # [K] fp32 coefficients (b, c, mean only with HAS_Y)
    NROWS, NCOLS, K,
    RELU: tl.constexpr,
    HAS_Y: tl.constexpr,
    WRITE_GRES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, k = _tile(NROWS, NCOLS, K, BLOCK_R, BLOCK_C, CHANNELS_LAST)
    km = k < K
    g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o <= 0, 0.0, g)  # NaN out passes g (threshold_backward)
    if WRITE_GRES:
        tl.store(gres_ptr + offs, g.to(gres_ptr.dtype.element_ty), mask=mask)
    dy = g * tl.load(a_ptr + k, mask=km, other=0.0)
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + k, mask=km, other=0.0)
        dy += tl.load(b_ptr + k, mask=km, other=0.0) * (y - mu) + tl.load(c_ptr + k, mask=km, other=0.0)
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


def _grid_args(t: torch.Tensor, channels_last: bool):
    """(grid, (NROWS, NCOLS, K), BLOCK_R, BLOCK_C) of the 2-D view of t (Tensor[N, K, P, Q])."""
    N, K, P, Q = t.shape
    rows, cols = (N * P * Q, K) if channels_last else (N * K, P * Q)
    br, bc = _tile_shape(cols)
    return (triton.cdiv(rows, br), triton.cdiv(cols, bc)), (rows, cols, K), br, bc


def _layout(t: torch.Tensor) -> bool:
    """True when t is (closest to) NHWC, False for NCHW; the kernels then need t dense in it."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.stride(1) <= min(t.stride(2), t.stride(3))


def _same_layout(t: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) and t.shape == like.shape else t.contiguous(memory_format=fmt)


def scale_shift_act(
    y: torch.Tensor,
    *,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    center: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out = act((y - center[k]) * a[k] + b[k] + residual)`` elementwise, fp32 math.

    Args:
        y (Tensor[N, K, P, Q]): NCHW- or NHWC-dense, fp16/bf16/fp32.
        a, b (Tensor[K] fp32 or None): per-channel scale and shift (both or neither).
        center (Tensor[K] fp32 or None): subtracted before the scale (needs ``a``/``b``).
        residual (Tensor[N, K, P, Q] or None): converted to y's layout if needed.
    Returns:
        out (Tensor[N, K, P, Q]) in y's dtype and memory format.
    """
    check_device(y, "input")
    if (a is None) != (b is None):
        raise ValueError("a, b: the scale and the shift go together (both or neither)")
    if center is not None and a is None:
        raise ValueError("center: needs a and b (the scale and shift it is applied with)")
    cl = _layout(y)
    y = _same_layout(y, y, cl)
    out = new_empty(y.shape, y.dtype, y.device, torch.channels_last if cl else torch.contiguous_format)
    if y.numel() == 0:
        return out
    if residual is not None:
        residual = _same_layout(residual, y, cl)
    dummy = y
    grid, sizes, br, bc = _grid_args(y, cl)
    _scale_shift_act_kernel[grid](
        y, residual if residual is not None else dummy, out,
        a if a is not None else dummy, b if b is not None else dummy, center if center is not None else dummy,
        *sizes,
        HAS_AFFINE=a is not None, HAS_CENTER=center is not None, HAS_RES=residual is not None, RELU=relu, CHANNELS_LAST=cl,
        BLOCK_R=br, BLOCK_C=bc, num_warps=_WARPS,
    )
    return out


def bn_backward_dy(
    grad_out: torch.Tensor,
    out: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    *,
    a: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    c: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
    relu: bool,
    want_grad_residual: bool,
    dy_dtype: torch.dtype,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dReLU + residual gradient + dBN input gradient in one pass.

    ``g = grad_out * (out > 0)`` (or ``grad_out`` without ReLU);
    ``dy = a[k] * g + b[k] * (y - mean[k]) + c[k]`` (the last two terms only when ``y`` is given).

    Args:
        grad_out, out, y (Tensor[N, K, P, Q]): same layout (NCHW- or NHWC-dense) as ``out``/``y``.
        a, b, c, mean (Tensor[K] fp32).
    Returns:
        (dy in ``dy_dtype``, grad_residual in grad_out's dtype or None), in the layout of
        ``out`` (or of ``y`` when there is no ReLU).
    """
    like = out if out is not None else (y if y is not None else grad_out)
    check_device(like, "grad_output")
    cl = _layout(like)
    grad_out = _same_layout(grad_out, like, cl)
    fmt = torch.channels_last if cl else torch.contiguous_format
    dy = new_empty(like.shape, dy_dtype, like.device, fmt)
    gres = new_empty(like.shape, grad_out.dtype, like.device, fmt) if want_grad_residual else None
    if dy.numel() == 0:
        return dy, gres
    if out is not None:
        out = _same_layout(out, like, cl)
    if y is not None:
        y = _same_layout(y, like, cl)
    dummy = dy
    grid, sizes, br, bc = _grid_args(dy, cl)
    _bn_backward_dy_kernel[grid](
        grad_out, out if out is not None else dummy, y if y is not None else dummy, dy,
        gres if gres is not None else dummy,
        a, b if b is not None else a, c if c is not None else a, mean if mean is not None else a,
        *sizes,
        RELU=relu, HAS_Y=y is not None, WRITE_GRES=gres is not None, CHANNELS_LAST=cl,
        BLOCK_R=br, BLOCK_C=bc, num_warps=_WARPS,
    )
    return dy, gres
