"""Implicit-GEMM conv2d forward (fprop) with a fused epilogue.

GEMM view (per group g): M = N*P*Q rows (output pixels), N_gemm = K/groups columns (output
channels), K_gemm = (C/groups)*R*S reduction. The A tile is gathered from the input on the
fly (no im2col buffer); the B tile is read from the filters. The fp32 accumulator then goes
through the epilogue, in this order and in fp32:

    y   = acc * scale[k] + shift[k]            (conv bias / eval BatchNorm folded in)
    (stats: per-tile count, mean, M2 of y per output channel; training BatchNorm)
    out = relu(y + residual)                   (each part optional)

and is rounded once on store. Inputs are read through their strides; the launcher makes the
input and filters channels-last-dense (C fastest) so A and B loads are contiguous along the
reduction, and writes the output in the memory format it is given.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import stem
from ._common import (
    INTERPRET, check_device, dense_like, interpreter_config, new_empty, set_blocks, tma_available, descriptor_2d,
)
from ._index import (
    as_row_tile, axis_bits, divmod_magic, fast_divmod, needs_int64, tap_bits, tap_bits_fit, wide,
)

# Smallest BLOCK_M of any configuration below: sizes the per-tile statistics buffers before
# the autotuner has picked a configuration (the launcher then keeps the rows it wrote).
MIN_BLOCK_M = 64

# Under the interpreter one small fixed configuration (still valid on a GPU: every tl.dot
# dimension >= 16, powers of two); on the GPU the autotuner picks per shape.
_INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=4)
# The filter tile the TMA descriptor loads: [BLOCK_N output channels, BLOCK_K reduction].
_DESC_BLOCKS = set_blocks(w_desc=("BLOCK_N", "BLOCK_K"))


def _gpu_configs():
    # No tile whose sm_90 build spills (128x128 on 4 warps, 128x256 and 256x128 on 8: resconv inspect).
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 3),  # the stem path's tap runs: 7 taps x 4 channels
        (128, 64, 16, 4, 3),  # 3 taps x 4 channels (a 3x3 stem), reductions of 16
        (64, 64, 32, 4, 5),
        (64, 32, 32, 4, 4),
        (64, 16, 32, 2, 4),
    ]:
        cfgs.append(
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages,
                          pre_hook=_DESC_BLOCKS)
        )
    return cfgs


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far wider than the problem (tiny Kg or reduction): they only waste work;
    and tiles narrower than 64 (output channels or K step) where the problem is that wide
    (small tensor-core instructions, more index math per product: resconv inspect)."""
    kg = named_args["Kg"]
    red = named_args["Cg"] * named_args["R"] * named_args["S"] if kwargs.get("FLAT_K") else named_args["Cg"]
    max_bn = max(16, triton.next_power_of_2(kg))
    max_bk = max(16, triton.next_power_of_2(red))
    min_bn = min(64, max_bn)
    min_bk = min(64, max_bk)  # a K step of 64 where the reduction has it: the per-step index work amortised
    kept = [c for c in configs if min_bn <= c.kwargs["BLOCK_N"] <= max_bn and min_bk <= c.kwargs["BLOCK_K"] <= max_bk]
    if kwargs.get("W_ROWS_PADDED"):  # the stem's loop reads each packed filter row as one block
        whole_rows = [c for c in configs if c.kwargs["BLOCK_K"] == max_bk]
        kept = [c for c in kept if c in whole_rows] or whole_rows
    return kept or configs[-1:]


@triton.jit(do_not_specialize=["M", "H", "W", "P", "Q", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                               "q_mul", "q_shift", "p_mul", "p_shift"])
def _conv2d_fprop_kernel(
    x_ptr,  # [N, C, H, W] input, strides sx* (channels may overlap: the stem's packed view)
    w_ptr,  # [K, C/groups, R, S] filters, strides sw*
    w_desc,  # W_TMA: TMA descriptor over the channels-last filters as [K, R*S*C/groups]; else unused
    out_ptr,  # [N, K, P, Q] output, strides so*
    scale_ptr,  # [K] fp32 (HAS_SCALE)
    shift_ptr,  # [K] fp32 (HAS_SHIFT)
    res_ptr,  # [N, K, P, Q] residual, strides sr* (HAS_RES)
    cnt_ptr,  # [T] fp32 rows per tile (STATS)
    mean_ptr,  # [T, K] fp32 per-tile channel mean of y (STATS)
    m2_ptr,  # [T, K] fp32 per-tile channel M2 of y (STATS)
    M, K, H, W, P, Q, Cg, Kg, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    q_mul, q_shift, p_mul, p_shift,  # divmod_magic(Q), divmod_magic(P)
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    son, sok, sop, soq,
    srn, srk, srp, srq,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    FLAT_K: tl.constexpr,  # reduce over (r, s, c) flattened: few channels per group (depthwise)
    TAP_MASK: tl.constexpr,  # some padding: taps may fall outside the image (without, none can)
    TAP_BITS: tl.constexpr,  # R*S <= 32: per-row tap masks precomputed as bits
    IDX64: tl.constexpr,  # 64-bit element offsets (a tensor reaches 2**31 elements)
    X_ALIGN: tl.constexpr,  # every x row offset and tap step is a multiple of this (elements)
    W_ALIGN: tl.constexpr,  # every filter column offset and tap step is a multiple of this
    W_TMA: tl.constexpr,  # filter tiles by TMA (w_desc): every BLOCK_K divides C/groups
    C_VEC: tl.constexpr,  # a power of two dividing C/groups (<= 8): the channel mask's vector width
    EVEN_C: tl.constexpr,  # BLOCK_K divides C/groups: no channel mask (a heuristic of the config)
    W_ROWS_PADDED: tl.constexpr,  # each filter's reduction rows are zero-padded past every BLOCK_K: no filter mask
    EVEN_M: tl.constexpr,  # BLOCK_M divides N*P*Q: no row tail (a heuristic of the config)
    OUT_LINEAR: tl.constexpr,  # out dense NHWC: a row's offset is its index times soq
    RES_LINEAR: tl.constexpr,  # residual dense NHWC (HAS_RES)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32" or "ieee"
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, so multiply exact fp32 copies
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    # Grouped tile order: GROUP_M row tiles share each column tile's filters in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Kg, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    t, q = fast_divmod(offs_m, Q, q_mul, q_shift)
    n, p = fast_divmod(t, P, p_mul, p_shift)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Kg
    k_glob = grp * Kg + offs_n

    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        x_row = wide(n, IDX64) * sxn + wide(grp * Cg, IDX64) * sxc
        w_col = wide(k_glob, IDX64) * swk
        KT = Cg * R * S
        for k0 in range(0, KT, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < KT
            c = kk % Cg
            rs = kk // Cg
            r = rs // S
            s = rs % S
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_mask = (m_mask[:, None] & k_mask[None, :]) & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a_off = x_row[:, None] + wide(ih, IDX64) * sxh + wide(iw, IDX64) * sxw + wide(c * sxc, IDX64)[None, :]
            a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
            b_off = w_col[None, :] + wide(c * swc + r * swr + s * sws, IDX64)[:, None]
            b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    elif W_ROWS_PADDED:
        # The stem (stem.py): S == 1, no padding, one channel block per filter row (BLOCK_K is
        # the packed rows' width, see _prune_configs), so each filter row is one pointer step
        # and the mask (the taps past the row's S * C_PAD columns are the next pixel's: never
        # read, so no NaN or Inf there reaches this pixel) is the same every step.
        x_row = tl.multiple_of(wide(n, IDX64) * sxn + wide(ih0, IDX64) * sxh + wide(iw0, IDX64) * sxw, X_ALIGN)
        a_offs = x_row[:, None] + (offs_k * sxc)[None, :]
        b_offs = tl.multiple_of(wide(k_glob, IDX64) * swk, W_ALIGN)[None, :] + (offs_k * swc)[:, None]
        a_mask = ((offs_k // C_VEC) < (Cg // C_VEC))[None, :]
        if not EVEN_M:
            a_mask = a_mask & m_mask[:, None]
        for r in range(0, R):
            x_step = tl.multiple_of(wide(r * dil_h, IDX64) * sxh, X_ALIGN)
            w_step = tl.multiple_of(wide(r, IDX64) * swr, W_ALIGN)
            a = tl.load(x_ptr + x_step + a_offs, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + w_step + b_offs, mask=n_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # One (r, s) tap and one chunk of channels per step, in one flat loop (Triton pipelines
        # it). Everything per row is computed once, here: the offset of tap (0, 0) (it may lie
        # in the padding: it is only read under the tap's mask) and, with TAP_BITS, which taps
        # fall inside the image. A step adds a scalar offset to the rows and ANDs one bit.
        x_row = tl.multiple_of(wide(n, IDX64) * sxn + wide(ih0, IDX64) * sxh + wide(iw0, IDX64) * sxw
                               + wide(grp * Cg, IDX64) * sxc, X_ALIGN)
        a_offs = x_row[:, None] + (offs_k * sxc)[None, :]
        b_offs = tl.multiple_of(wide(k_glob, IDX64) * swk, W_ALIGN)[None, :] + (offs_k * swc)[:, None]
        if TAP_MASK and TAP_BITS:
            rows_ok = tap_bits(axis_bits(ih0, dil_h, R, H), axis_bits(iw0, dil_w, S, W), R, S)
            rows_ok = as_row_tile(tl.where(m_mask, rows_ok, 0), offs_k, Cg, BLOCK_K)
        elif not TAP_MASK:
            rows_ok = as_row_tile(m_mask.to(tl.int32), offs_k, Cg, BLOCK_K) != 0
        n_cb = tl.cdiv(Cg, BLOCK_K)
        r = 0
        s = 0
        cb = 0
        bit = 1
        for _ in range(0, R * S * n_cb):
            x_step = tl.multiple_of(wide(r * dil_h, IDX64) * sxh + wide(s * dil_w, IDX64) * sxw
                                    + wide(cb * BLOCK_K, IDX64) * sxc, X_ALIGN)
            w_step = tl.multiple_of(wide(r, IDX64) * swr + wide(s, IDX64) * sws + wide(cb * BLOCK_K, IDX64) * swc,
                                    W_ALIGN)
            if not TAP_MASK:  # no padding: every tap reads inside the image
                a_mask = rows_ok
            elif TAP_BITS:
                a_mask = (rows_ok & bit) != 0
            else:
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                a_mask = (m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            if W_TMA:  # rows past the group's are other filters: their columns are never stored
                b = w_desc.load([grp * Kg + pid_n * BLOCK_N, (r * S + s) * Cg + cb * BLOCK_K]).T
                if EVEN_M and not TAP_MASK:
                    a = tl.load(x_ptr + x_step + a_offs)
                else:
                    a = tl.load(x_ptr + x_step + a_offs, mask=a_mask, other=0.0)
            elif EVEN_C and EVEN_M and not TAP_MASK:
                a = tl.load(x_ptr + x_step + a_offs)
                b = tl.load(w_ptr + w_step + b_offs, mask=n_mask[None, :], other=0.0)
            elif EVEN_C:
                a = tl.load(x_ptr + x_step + a_offs, mask=a_mask, other=0.0)
                b = tl.load(w_ptr + w_step + b_offs, mask=n_mask[None, :], other=0.0)
            else:
                c_ok = (cb * BLOCK_K + offs_k) // C_VEC < Cg // C_VEC  # constant along each C_VEC vector
                a = tl.load(x_ptr + x_step + a_offs, mask=a_mask & c_ok[None, :], other=0.0)
                if W_ROWS_PADDED:  # the stem's packed filters: zeros past the row, read unmasked
                    b = tl.load(w_ptr + w_step + b_offs, mask=n_mask[None, :], other=0.0)
                else:
                    b = tl.load(w_ptr + w_step + b_offs, mask=c_ok[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            # next (r, s, channel block) without a division: cb fastest, then s, then r
            cb += 1
            next_tap = cb == n_cb
            cb = tl.where(next_tap, 0, cb)
            s = tl.where(next_tap, s + 1, s)
            bit = tl.where(next_tap, bit << 1, bit)
            next_row = s == S
            s = tl.where(next_row, 0, s)
            r = tl.where(next_row, r + 1, r)

    # ---- epilogue, all in fp32 on the accumulator ----
    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + k_glob, mask=n_mask, other=1.0)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + k_glob, mask=n_mask, other=0.0)[None, :]
    if STATS:
        # Per-tile moments (count, mean, M2) of y per channel; combined later with Chan's
        # formula, never as E[y^2] - E[y]^2. The sum is taken relative to the tile's first
        # row (a pivot), so a large common offset in y does not round the sum away.
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
        rows_f = rows.to(tl.float32)
        valid = m_mask[:, None]
        first = (tl.arange(0, BLOCK_M) == 0)[:, None]
        pivot = tl.sum(tl.where(first, y, 0.0), axis=0)
        t_mean = pivot + tl.sum(tl.where(valid, y - pivot[None, :], 0.0), axis=0) / rows_f
        d = tl.where(valid, y - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        tl.store(mean_ptr + pid_m.to(tl.int64) * K + k_glob, t_mean, mask=n_mask)
        tl.store(m2_ptr + pid_m.to(tl.int64) * K + k_glob, t_m2, mask=n_mask)
        if pid_n == 0:
            if grp == 0:
                tl.store(cnt_ptr + pid_m, rows_f)

    kw = wide(k_glob, IDX64)
    o_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        if RES_LINEAR:  # dense NHWC: the (n, p, q) offset is the row's index times the pixel stride
            r_row = wide(offs_m, IDX64) * srq
        else:
            r_row = wide(n, IDX64) * srn + wide(p, IDX64) * srp + wide(q, IDX64) * srq
        y = y + tl.load(res_ptr + r_row[:, None] + (kw * srk)[None, :], mask=o_mask, other=0.0).to(tl.float32)
    if RELU:
        # NaN must pass through, as torch.relu does: max.NaN, not max
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if OUT_LINEAR:
        o_row = wide(offs_m, IDX64) * soq
    else:
        o_row = wide(n, IDX64) * son + wide(p, IDX64) * sop + wide(q, IDX64) * soq
    tl.store(out_ptr + o_row[:, None] + (kw * sok)[None, :], y.to(out_ptr.dtype.element_ty), mask=o_mask)


_conv2d_fprop = triton.heuristics({
    "EVEN_C": lambda a: a["Cg"] % a["BLOCK_K"] == 0,
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
})(_conv2d_fprop_kernel)
_conv2d_fprop_autotuned = triton.autotune(
    configs=_gpu_configs(),
    key=["M", "Kg", "Cg", "R", "S", "stride_h", "stride_w", "H", "W", "FLAT_K", "STATS", "HAS_RES"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_conv2d_fprop)


def use_flat_k(cg: int) -> bool:
    """Flatten (r, s, c) into one reduction index when channels per group are too few to
    fill a 16-wide reduction tile (depthwise convs; small-C convs off the stem path)."""
    return cg < 16


def every_block_divides(c: int) -> bool:
    """Whether every BLOCK_K a configuration may use for a reduction of c (at most the next
    power of two of c, at least 16, at most 64) divides it: no block runs past c."""
    return c % 64 == 0 or c in (16, 32)


def _nhwc_rows(t: torch.Tensor) -> bool:
    """Whether t[n, :, p, q] starts at ((n*P + p)*Q + q) * t.stride(3): NHWC-dense pixels."""
    _, _, P, Q = t.shape
    return t.stride(2) == Q * t.stride(3) and t.stride(0) == P * t.stride(2)


def pow2_alignment(*values: int, cap: int = 16) -> int:
    """Largest power of two <= cap dividing every value (zeros divide by anything)."""
    a = cap
    for v in values:
        while v % a:
            a //= 2
    return a


def conv2d_fprop(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    out_shape: tuple[int, int, int, int],
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    allow_tf32: bool = False,
    out_memory_format: torch.memory_format = torch.channels_last,
    stats: bool = False,
):
    """Launch the fused fprop kernel.

    Args:
        x (Tensor[N, C, H, W]): fp16/bf16/fp32; made channels-last-dense if it is not (with
            C <= 4, packed for the stem path instead: :mod:`.stem`). Not modified.
        weight (Tensor[K, C/groups, R, S]): x's dtype; made channels-last-dense (K R S C) if not.
        stride, padding (top, bottom, left, right), dilation, groups: normalised geometry.
        out_shape: (N, K, P, Q).
        scale, shift (Tensor[K] or None): per-channel epilogue, read as fp32.
        residual (Tensor[N, K, P, Q] or None): x's dtype, added after scale/shift.
        relu: apply max(., 0) last.
        allow_tf32: fp32 inputs use TF32 tensor-core products (else IEEE fp32).
        out_memory_format: torch.channels_last or torch.contiguous_format for the output.
        stats: also return per-tile BatchNorm partials of y = scale * conv + shift.

    Returns:
        out (Tensor[N, K, P, Q], x's dtype, ``out_memory_format``); with ``stats``, also
        ``(count: Tensor[T], mean: Tensor[T, K], m2: Tensor[T, K])`` fp32, one row per row
        tile of the configuration that ran (T = ceil(N*P*Q / BLOCK_M)).
    """
    check_device(x, "input")
    N, K, P, Q = out_shape
    Kg = K // groups
    Cg = weight.shape[1]
    R, S = weight.shape[2], weight.shape[3]
    M = N * P * Q
    out = new_empty(out_shape, x.dtype, x.device, out_memory_format)
    T = triton.cdiv(M, MIN_BLOCK_M) if stats else 1
    if stats:
        cnt = new_empty((T,), torch.float32, x.device)
        mean = new_empty((T, K), torch.float32, x.device)
        m2 = new_empty((T, K), torch.float32, x.device)
    if M == 0:
        return (out, cnt[:0], mean[:0], m2[:0]) if stats else out
    if M >= 2**31:
        raise ValueError(f"input: N*P*Q = {M} output pixels, expected fewer than 2**31")

    is_stem = stem.applies(x.shape[1], S, groups, dilation[1])
    if is_stem:  # an R x 1 conv over the packed input's tap runs
        x = stem.pack_input(x, padding, S)
        weight = stem.pack_weight(weight)
        Cg, S = weight.shape[1], 1
        padding, dilation = (0, 0, 0, 0), (dilation[0], 1)
    else:
        x = dense_like(x, torch.channels_last)
        weight = dense_like(weight, torch.channels_last)
    f32 = lambda v: None if v is None else v.to(torch.float32).contiguous()  # noqa: E731
    scale, shift = f32(scale), f32(shift)
    if residual is not None and not residual.is_contiguous(memory_format=out_memory_format):
        residual = residual.contiguous(memory_format=out_memory_format)
    dummy = out  # stands in for absent optional pointers (never dereferenced)
    res = residual if residual is not None else dummy
    precision = "tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee"
    flat_k = use_flat_k(Cg) and not is_stem  # (the stem's runs are contiguous: the direct path, masked)
    sxn, sxc, sxh, sxw = x.stride()
    swk, swc, swr, sws = weight.stride()
    # Row offsets and tap steps are sums of these: their common power of two is what the
    # compiler may assume for vector loads.
    x_align = pow2_alignment(sxn, stride[0] * sxh, padding[0] * sxh, stride[1] * sxw, padding[2] * sxw,
                             dilation[0] * sxh * (R > 1), dilation[1] * sxw * (S > 1), Cg * sxc * (groups > 1))
    w_align = pow2_alignment(swk, swr * (R > 1), sws * (S > 1))
    w_desc = None
    if not flat_k and every_block_divides(Cg) and tma_available(x.device):
        w_desc = descriptor_2d(weight.permute(0, 2, 3, 1).reshape(K, R * S * Cg))
    args = (
        x, weight, w_desc if w_desc is not None else weight, out,
        scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        res,
        cnt if stats else dummy,
        mean if stats else dummy,
        m2 if stats else dummy,
        M, K, x.shape[2], x.shape[3], P, Q, Cg, Kg, R, S,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *divmod_magic(Q), *divmod_magic(P),
        sxn, sxc, sxh, sxw, swk, swc, swr, sws, *out.stride(), *res.stride(),
    )
    flags = dict(
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None,
        RELU=relu,
        STATS=stats,
        FLAT_K=flat_k,
        TAP_MASK=any(padding),
        TAP_BITS=tap_bits_fit(R * S),
        IDX64=needs_int64(x, weight, out, residual),
        OUT_LINEAR=_nhwc_rows(out),
        RES_LINEAR=residual is not None and _nhwc_rows(residual),
        X_ALIGN=x_align,
        W_ALIGN=w_align,
        W_ROWS_PADDED=is_stem,
        C_VEC=pow2_alignment(Cg, cap=8),
        W_TMA=w_desc is not None,
        PRECISION=precision,
        DOT_FP32=INTERPRET and x.dtype == torch.bfloat16,
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Kg, meta["BLOCK_N"]), groups)

    if INTERPRET:  # (TMA only where a test forces it: tma_available is False here)
        cfg = dict(_INTERPRET_CONFIG, BLOCK_K=stem.row_width(Cg)) if is_stem else \
            interpreter_config(_INTERPRET_CONFIG, BLOCK_N=Kg, BLOCK_K=Cg)
        if w_desc is not None:
            _DESC_BLOCKS(dict(w_desc=w_desc, **cfg))
        _conv2d_fprop[grid](*args, **flags, **cfg)
        block_m = cfg["BLOCK_M"]
    else:
        with torch.cuda.device(x.device):
            _conv2d_fprop_autotuned[grid](*args, **flags)
        block_m = _conv2d_fprop_autotuned.best_config.kwargs["BLOCK_M"]
    if not stats:
        return out
    # Rows past the tiles of the configuration that ran may hold autotuning leftovers.
    t_used = triton.cdiv(M, block_m)
    return out, cnt[:t_used], mean[:t_used], m2[:t_used]
