"""The stem path: convolutions with few input channels (an RGB image's 3) as a 1-D conv over
16-byte-friendly rows.

A 7x7 conv over 3 channels reduces over only 147 values per output pixel, 3 contiguous
ones at a time in NHWC: loads of 6 bytes, per-element index arithmetic (the flat (r, s, c)
path). Instead, the input is packed once into ``xp[N, Hp, Wp, C_PAD]`` (channels padded with
zeros to C_PAD = 4, the spatial padding written out as zeros, the width rounded up so every
tap run stays inside the row). Then, for output pixel (p, q) and filter row r, the taps
s = 0..S-1 over every channel are ``S_PAD * C_PAD`` *consecutive* elements of xp starting
at ``xp[n, p*stride_h + r*dil_h, q*stride_w, 0]``. Seen through an overlapping strided view,
``x'[n, c', h, w] = xp[n, h, 0, 0] + w*C_PAD + c'`` with ``c' < S_PAD * C_PAD``, the conv is an
R x 1 conv over S_PAD * C_PAD channels with no padding: the implicit-GEMM kernels' direct path,
with contiguous, aligned, mask-free operand rows (16 bytes per load when the stride is even,
8 otherwise) and a reduction of R x 32 or 64 (147 -> 224 for the 7x7 stem: the zero taps
cost tensor-core time, which this memory-bound layer has to spare). The filters are packed
to ``[K, R, S_PAD, C_PAD]`` alike, and the weight gradient is unpacked back.

Installed as ``resconv.triton_kernels.stem``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, new_empty

C_PAD = 4  # channels of the packed input: 8 bytes per pixel in 16-bit types
_BLOCK_W = 64 if INTERPRET else 256


def s_pad(C: int, S: int, groups: int, dil_w: int) -> Optional[int]:
    """Taps per filter row in the packed reduction (S_PAD * C_PAD: 32 or 64; not 16, so that
    the kernels' 32-wide reduction tiles fit a 3x3 stem too), or None when the stem path does
    not apply (more than C_PAD channels, groups, dilated columns, rows wider than 16 taps)."""
    if groups != 1 or C > C_PAD or dil_w != 1:
        return None
    for sp in (8, 16):
        if S <= sp:
            return sp
    return None


@triton.jit(do_not_specialize=["C", "H", "W", "Hp", "Wp", "pad_h", "pad_w"])
def _pack_input_kernel(
    x_ptr,  # [N, C, H, W] input, strides sx*
    xp_ptr,  # [N, Hp, Wp, C_PAD] packed, dense (written)
    C, H, W, Hp, Wp, pad_h, pad_w,
    sxn, sxc, sxh, sxw,
    C_PAD: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)  # n * Hp + hp
    n = row // Hp
    h = row % Hp - pad_h
    wp = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, C_PAD)
    w = wp - pad_w
    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + (w.to(tl.int64) * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :]
    v = tl.load(x_ptr + src, mask=inside[:, None] & (c < C)[None, :], other=0.0)
    dst = row.to(tl.int64) * Wp * C_PAD + (wp.to(tl.int64) * C_PAD)[:, None] + c[None, :]
    tl.store(xp_ptr + dst, v, mask=(wp < Wp)[:, None] & (c < C_PAD)[None, :])


def packed_width(W: int, pad_l: int, pad_r: int, S: int, sp: int) -> int:
    """Wp: the padded width plus the (sp - S) columns the widened tap runs read, even (so that
    a row of xp starts 16-byte aligned in 16-bit types)."""
    wp = W + pad_l + pad_r + (sp - S)
    return wp + (wp % 2)


def pack_input(x: torch.Tensor, padding: tuple, S: int, sp: int) -> torch.Tensor:
    """The packed input ``xp`` as its overlapping view ``x'[N, sp*C_PAD, Hp, Wp - sp + 1]``
    (see the module docstring). x (Tensor[N, C, H, W], C <= C_PAD) is read through its strides."""
    N, C, H, W = x.shape
    pt, pb, pl, pr = padding
    Hp, Wp = H + pt + pb, packed_width(W, pl, pr, S, sp)
    xp = new_empty((N, Hp, Wp, C_PAD), x.dtype, x.device)
    if xp.numel():
        _pack_input_kernel[(N * Hp, triton.cdiv(Wp, _BLOCK_W))](
            x, xp, C, H, W, Hp, Wp, pt, pl, *x.stride(), C_PAD=C_PAD, BLOCK_W=_BLOCK_W,
        )
    return xp.as_strided((N, sp * C_PAD, Hp, Wp - sp + 1), (Hp * Wp * C_PAD, 1, Wp * C_PAD, C_PAD))


def pack_weight(weight: torch.Tensor, sp: int) -> torch.Tensor:
    """Filters [K, C, R, S] as the packed view ``w'[K, sp*C_PAD, R, 1]`` of a dense
    ``[K, R, sp, C_PAD]`` copy (zeros in the padded taps and channels)."""
    K, C, R, S = weight.shape
    wp = torch.zeros((K, R, sp, C_PAD), dtype=weight.dtype, device=weight.device)
    wp[:, :, :S, :C] = weight.permute(0, 2, 3, 1)
    return wp.as_strided((K, sp * C_PAD, R, 1), (R * sp * C_PAD, 1, sp * C_PAD, sp * C_PAD))


def unpack_weight_grad(gw_packed: torch.Tensor, C: int, S: int, out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the packed filters (Tensor[K, sp*C_PAD, R, 1]) written into
    ``out`` (Tensor[K, C, R, S], any memory format): the padded taps and channels dropped."""
    K, _, R, _ = gw_packed.shape
    sp = gw_packed.shape[1] // C_PAD
    g = gw_packed.permute(0, 2, 1, 3).reshape(K, R, sp, C_PAD)[:, :, :S, :C]
    out.copy_(g.permute(0, 3, 1, 2))
    return out
