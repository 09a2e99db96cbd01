"""The stem path: convolutions with few input channels (an RGB image's 3) as a 1-D conv over
aligned rows.

A 7x7 conv over 3 channels reduces over only 147 values per output pixel, 3 contiguous
ones at a time in NHWC: loads of 6 bytes, per-element index arithmetic (the flat (r, s, c)
path). Instead, the input is packed once into ``xp[N, Hp, Wp, C_PAD]`` (channels padded with
zeros to C_PAD = 4, the spatial padding written out as zeros, the width made even). Then, for
output pixel (p, q) and filter row r, the taps s = 0..S-1 over every channel are
``S * C_PAD`` *consecutive* elements of xp starting at ``xp[n, p*stride_h + r*dil_h,
q*stride_w, 0]``. Seen through an overlapping strided view, ``x'[n, c', h, w] =
xp[n, h, 0, 0] + w*C_PAD + c'`` with ``c' < S * C_PAD``, the conv is an R x 1 conv over
S * C_PAD channels with no padding: the implicit-GEMM kernels' direct path, with contiguous,
8-byte-aligned operand rows and no tap masks. The fprop reads each filter row as one
reduction tile of ``row_width`` (16, 32 or 64) columns; its input columns past S * C_PAD are
masked off (the next pixels' values are never read, so a NaN or Inf next door cannot turn a
zero filter tap into NaN), and the filters are packed to ``[K, R, row_width]`` with zeros
after each row's S taps x C_PAD channels, so they are read unmasked. The weight gradient
reads the input rows whole (the columns past S * C_PAD are discarded; SLACK elements after
the buffer keep those reads in bounds) and is unpacked back.

Installed as ``resconv.triton_kernels.stem``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, new_empty

C_PAD = 4  # channels of the packed input: 8 bytes per pixel in 16-bit types
MAX_S = 16  # a filter row of up to 16 taps: a reduction of at most 64
SLACK = 128  # readable elements after the packed input: the widest column tile (BLOCK_N <= 128)
_BLOCK_W = 64 if INTERPRET else 256


def applies(C: int, S: int, groups: int, dil_w: int) -> bool:
    """Whether the stem path takes a conv: at most C_PAD input channels, no groups, undilated
    columns, filter rows of at most MAX_S taps."""
    return groups == 1 and C <= C_PAD and dil_w == 1 and S <= MAX_S


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


def packed_width(W: int, pad_l: int, pad_r: int) -> int:
    """Wp: the padded width, made even (so that a row of xp starts 16-byte aligned in 16-bit types)."""
    wp = W + pad_l + pad_r
    return wp + (wp % 2)


def pack_input(x: torch.Tensor, padding: tuple, S: int) -> torch.Tensor:
    """The packed input ``xp`` as its overlapping view ``x'[N, S*C_PAD, Hp, Wp - S + 1]``
    (see the module docstring). x (Tensor[N, C, H, W], C <= C_PAD) is read through its strides."""
    N, C, H, W = x.shape
    pt, pb, pl, pr = padding
    Hp, Wp = H + pt + pb, packed_width(W, pl, pr)
    # SLACK elements after the last pixel: the weight-gradient kernel reads x' rows whole,
    # past the S * C_PAD columns it keeps (see conv_wgrad's COLS_READABLE)
    xp = new_empty((N * Hp * Wp * C_PAD + SLACK,), x.dtype, x.device)[: N * Hp * Wp * C_PAD].view(N, Hp, Wp, C_PAD)
    if xp.numel():
        _pack_input_kernel[(N * Hp, triton.cdiv(Wp, _BLOCK_W))](
            x, xp, C, H, W, Hp, Wp, pt, pl, *x.stride(), C_PAD=C_PAD, BLOCK_W=_BLOCK_W,
        )
    return xp.as_strided((N, S * C_PAD, Hp, Wp - S + 1), (Hp * Wp * C_PAD, 1, Wp * C_PAD, C_PAD))


def row_width(cols: int) -> int:
    """Elements per packed filter row of ``cols = S * C_PAD`` taps x channels: rounded up to a
    power of two, at least 16 (the fprop's reduction tile for the stem, see its pruner), so no
    tile reads past the row."""
    return max(16, triton.next_power_of_2(cols))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Filters [K, C, R, S] as the packed view ``w'[K, S*C_PAD, R, 1]`` of a dense
    ``[K, R, row_width(S * C_PAD)]`` copy: each row's S taps x C_PAD channels, zeros in the padded
    channels and after the taps (the kernel reads the rows whole, unmasked)."""
    K, C, R, S = weight.shape
    rw = row_width(S * C_PAD)
    wp = torch.zeros((K, R, rw), dtype=weight.dtype, device=weight.device)
    wp[..., : S * C_PAD].unflatten(-1, (S, C_PAD))[..., :C] = weight.permute(0, 2, 3, 1)
    return wp.as_strided((K, S * C_PAD, R, 1), (R * rw, 1, rw, rw))


def unpack_weight_grad(gw_packed: torch.Tensor, C: int, out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the packed filters (Tensor[K, S*C_PAD, R, 1]) written into
    ``out`` (Tensor[K, C, R, S], any memory format): the padded channels dropped."""
    K, _, R, _ = gw_packed.shape
    S = gw_packed.shape[1] // C_PAD
    g = gw_packed.permute(0, 2, 1, 3).reshape(K, R, S, C_PAD)[..., :C]
    out.copy_(g.permute(0, 3, 1, 2))
    return out
