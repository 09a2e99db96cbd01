"""Index arithmetic the implicit-GEMM kernels share, kept out of their main loops.

* Tap validity bits: for each GEMM row (an output pixel of fprop, an input pixel of dgrad)
  one int32 whose bit ``t`` says whether filter tap ``t`` reads inside the image. Computed
  once per tile, before the K loop; in the loop a row's mask is one AND with the tap's bit
  (instead of two compares per axis and per row, every iteration).
* Division by an invariant integer as a multiply-high (Granlund & Montgomery, "Division by
  Invariant Integers using Multiplication", PLDI 1994; the form CUTLASS's FastDivmod uses):
  ``x // d == (umulhi(x, mul) + x) >> shift`` for ``0 <= x < 2**31``, with ``mul`` and
  ``shift`` from :func:`divmod_magic` computed on the host.

Installed as ``resconv.triton_kernels._index``.
"""
from __future__ import annotations

import triton.language as tl

from ._common import device_function

# Tap bits live in an int32: filters with more taps (per stride phase, for dgrad) take the
# kernels' direct-compare path.
MAX_TAP_BITS = 32


@device_function
def axis_bits(pos0, step, taps, size):
    """Per element of ``pos0`` (int32): bit t set where ``0 <= pos0 + t*step < size``, t < taps."""
    bits = tl.zeros_like(pos0)
    for t in range(0, taps):
        pos = pos0 + t * step
        bits |= ((pos >= 0) & (pos < size)).to(tl.int32) << t
    return bits


@device_function
def tap_bits(h_bits, w_bits, taps_h, taps_w):
    """Bit ``i*taps_w + j`` set where bit i of h_bits and bit j of w_bits are (row-major taps)."""
    bits = tl.zeros_like(h_bits)
    for i in range(0, taps_h):
        bits |= tl.where(((h_bits >> i) & 1) != 0, w_bits << (i * taps_w), 0)
    return bits


@device_function
def wide(v, IDX64: tl.constexpr):
    """v as an element offset: int64 where a tensor can reach 2**31 elements, else as is (int32)."""
    if IDX64:
        return tl.cast(v, tl.int64)
    return v


@device_function
def as_row_tile(v, offs_k, n, BLOCK_K: tl.constexpr):
    """v (one value per row) as a [rows, BLOCK_K] tile of equal columns.

    Masks formed from a 1-D per-row vector inside a K loop are moved into the loads' layout
    through shared memory at every step (seen in sm_90 SASS); from this tile they are formed
    in place. The column test is always true (n >= 0), and a multiple of BLOCK_K on its right
    keeps it constant along each vector, but the compiler cannot fold it away.
    """
    always = offs_k < (n // BLOCK_K + 1) * BLOCK_K
    return tl.where(always[None, :], v[:, None], 0)


@device_function
def fast_divmod(x, d, mul, shift):
    """(x // d, x % d) for int32 ``0 <= x < 2**31`` and ``(mul, shift) = divmod_magic(d)``."""
    q = ((tl.umulhi(x.to(tl.uint32), mul.to(tl.uint32)) + x.to(tl.uint32)) >> shift).to(tl.int32)
    return q, x - q * d


def divmod_magic(d: int) -> tuple[int, int]:
    """(mul, shift) for :func:`fast_divmod` by d (1 <= d < 2**31):
    ``shift = ceil(log2 d)``, ``mul = floor(2**32 * (2**shift - d) / d) + 1``."""
    if not 1 <= d < 2**31:
        raise ValueError(f"d: expected 1 <= d < 2**31, got {d}")
    shift = (d - 1).bit_length()
    return (2**32 * (2**shift - d)) // d + 1, shift


def tap_bits_fit(taps: int) -> bool:
    return taps <= MAX_TAP_BITS


def needs_int64(*tensors) -> bool:
    """Whether element offsets into any of the tensors can reach 2**31 (then 64-bit offsets)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        if span >= 2**31:
            return True
    return False

