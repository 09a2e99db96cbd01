"""Implicit-GEMM conv2d weight gradient (wgrad) and bias gradient, deterministic split-K.

    dW[k, c, r, s] = sum_{n, p, q} dy[n, k, p, q] * x[n, c, p*stride_h - pad_top + r*dil_h, q*stride_w - pad_left + s*dil_w]
    db[k]          = sum_{n, p, q} dy[n, k, p, q]

GEMM view (per group): M = K/groups rows, N_gemm = (C/groups) * R * S columns, reduced over
N*P*Q. That reduction is long and the output small, so it is split into SPLIT contiguous
chunks (one grid axis), SPLIT chosen for the tile the autotuner picked (about two waves of
programs): each program writes its fp32 partial tile to its own slice of a
[SPLIT, K, R, S, C/groups] buffer, and a second pass sums the slices in a fixed order —
no atomics, bitwise reproducible. With SPLIT == 1 the kernel stores the result directly.
The bias gradient is reduced from the same dy tiles by the programs of the first column tile.

Main loop: the x rows' output pixels (n, p, q) are divided out once per program
(``_index.fast_divmod``) and advanced by BLOCK_K pixels per step with one carry per digit,
never ``%``/``//`` in the loop; with dy dense in NHWC its rows are consecutive, so the dy
tile is a pointer step. Few input channels go through the stem path
(:mod:`.stem`: the packed input's tap runs as channels) or, for groups, the flat (r, s, c)
columns. The dReLU/dBN prologue is materialised first, as in :mod:`.conv_dgrad`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import stem
from ._common import INTERPRET, check_device, interpreter_config, new_empty
from ._index import divmod_magic, fast_divmod, needs_int64, wide
from .conv_dgrad import materialize_dy, tile_fits
from .conv_fprop import pow2_alignment

_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_REDUCE_BLOCK = 256 if INTERPRET else 1024
MAX_SPLIT = 64


def _gpu_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 8, 4),  # not on 4 warps: each x row's index math is repeated by 8 threads (inspect)
        (64, 32, 64, 4, 4),  # the stem path's tap runs: 7 taps x 4 channels
        (64, 16, 64, 4, 4),  # 3 taps x 4 channels (a 3x3 stem)
        (32, 64, 64, 4, 4),
        (32, 32, 64, 2, 4),
        (16, 32, 128, 2, 3),
        (16, 16, 64, 2, 4),  # few channels per group (depthwise)
    ]:
        cfgs.append(
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
        )
    return cfgs


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (few channels per group): they only waste work;
    tiles much smaller than it (under 64 x 32 where it is that large: small tensor-core
    instructions, more index math per product); and flat-gathered x tiles that would not fit
    in registers."""
    kg, cg = named_args["Kg"], named_args["Cg"]
    cols = cg * named_args["R"] * named_args["S"] if kwargs.get("FLAT_N") else cg
    max_bm = max(16, triton.next_power_of_2(kg))
    max_bn = max(16, triton.next_power_of_2(cols))
    min_bm, min_bn = min(64, max_bm), min(32, max_bn)
    kept = [c for c in configs if min_bm <= c.kwargs["BLOCK_M"] <= max_bm and min_bn <= c.kwargs["BLOCK_N"] <= max_bn
            and (not kwargs.get("FLAT_N", False) or tile_fits(c, "BLOCK_K", "BLOCK_N"))]
    return kept or configs[-1:]


def split_for(args: dict) -> int:
    """SPLIT for a launch (kernel arguments and configuration): ``split_req`` if nonzero,
    else about ``target`` programs (two waves), each split reducing at least 4 BLOCK_K
    steps, at most MAX_SPLIT splits."""
    if args["split_req"]:
        return args["split_req"]
    cols = triton.cdiv(args["R"] * args["S"] * args["Cg"], args["BLOCK_N"]) if args["FLAT_N"] \
        else args["R"] * args["S"] * triton.cdiv(args["Cg"], args["BLOCK_N"])
    tiles = (args["K"] // args["Kg"]) * triton.cdiv(args["Kg"], args["BLOCK_M"]) * cols
    by_length = triton.cdiv(args["NPQ"], 4 * args["BLOCK_K"])
    return max(1, min(triton.cdiv(args["target"], tiles), by_length, MAX_SPLIT))


@triton.jit(do_not_specialize=["NPQ", "H", "W", "P", "Q", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
                               "dil_w", "q_mul", "q_shift", "p_mul", "p_shift", "target", "split_req"])
def _conv2d_wgrad_kernel(
    dy_ptr,  # [N, K, P, Q] gradient at the conv output, strides sd*
    x_ptr,  # [N, C, H, W] conv input, strides sx* (channels may overlap: the stem's packed view)
    gw_ptr,  # [K, C/groups, R, S] weight gradient (DIRECT), strides sg*
    gb_ptr,  # [K] bias gradient (DIRECT and HAS_BIAS)
    part_ptr,  # [SPLIT, K, R, S, C/groups] fp32 weight-gradient partials (not DIRECT)
    bpart_ptr,  # [SPLIT, K] fp32 bias-gradient partials (not DIRECT, HAS_BIAS)
    NPQ, H, W, P, Q, Cg, Kg, K, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    q_mul, q_shift, p_mul, p_shift,  # divmod_magic(Q), divmod_magic(P)
    target, split_req,  # split_for's inputs (for the DIRECT heuristic and the grid; unused here)
    sdn, sdk, sdp, sdq,
    sxn, sxc, sxh, sxw,
    sgk, sgc, sgr, sgs,
    HAS_BIAS: tl.constexpr,
    FLAT_N: tl.constexpr,  # columns are (r, s, c) flattened: for few input channels per group
    DY_LINEAR: tl.constexpr,  # dy's (n, p, q) offset is m * sdq (dense NHWC): the dy tile is a pointer step
    IDX64: tl.constexpr,  # 64-bit element offsets (a tensor reaches 2**31 elements)
    X_ALIGN: tl.constexpr,  # every x row offset is a multiple of this (elements)
    C_VEC: tl.constexpr,  # a power of two dividing C/groups (<= 8): the channel mask's vector width
    DIRECT: tl.constexpr,  # SPLIT == 1: store the final gradients in their dtype (a heuristic)
    EVEN_M: tl.constexpr,  # BLOCK_M divides K/groups (a heuristic)
    EVEN_N: tl.constexpr,  # BLOCK_N divides C/groups (a heuristic; the direct columns only)
    COLS_READABLE: tl.constexpr,  # the stem's packed x: columns past Cg are readable and discarded: no column mask
    EVEN_NPQ: tl.constexpr,  # BLOCK_K divides N*P*Q: no row tail (a heuristic)
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    num_pid_m = tl.cdiv(Kg, BLOCK_M)
    if FLAT_N:
        num_pid_n = tl.cdiv(R * S * Cg, BLOCK_N)
    else:
        n_cb = tl.cdiv(Cg, BLOCK_N)
        num_pid_n = R * S * n_cb
    # Grouped tile order: GROUP_M row tiles share each column tile's input rows in L2.
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Kg
    k_glob = grp * Kg + offs_m
    if FLAT_N:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols < R * S * Cg
        c = cols % Cg
        rs = cols // Cg
    else:
        # One (r, s) tap per column tile: the input rows it reads share one 1-D mask.
        rs = pid_n // n_cb
        c = (pid_n % n_cb) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = c // C_VEC < Cg // C_VEC  # constant along each C_VEC vector
    r = rs // S
    s = rs % S
    # grp * Cg is a multiple of C_VEC (it divides Cg): with it the column vectors stay aligned
    if COLS_READABLE:  # the stem: groups == 1
        x_col = wide(c * sxc, IDX64)
    else:
        x_col = wide((tl.multiple_of(grp * Cg, C_VEC) + c) * sxc, IDX64)
    dy_k = wide(k_glob, IDX64) * sdk

    # This split's rows [start, end) of N*P*Q: SPLIT equal chunks, multiples of BLOCK_K.
    chunk = tl.cdiv(tl.cdiv(NPQ, tl.num_programs(2)), BLOCK_K) * BLOCK_K
    start = split * chunk
    end = tl.minimum(start + chunk, NPQ)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    op_ty = x_ptr.dtype.element_ty
    if DY_LINEAR:  # the dy^T tile [k, rows] is a pointer step: its offsets are computed once
        a_offs = dy_k[:, None] + (wide(offs_k, IDX64) * sdq)[None, :]
    if not FLAT_N:
        # Each x row's output pixel (n, p, q), divided out once and then advanced by BLOCK_K
        # pixels per step, as a mixed-radix number: at most one carry per digit.
        t0, q_b = fast_divmod(start + offs_k, Q, q_mul, q_shift)
        n_b, p_b = fast_divmod(t0, P, p_mul, p_shift)
        step_t, step_q = BLOCK_K // Q, BLOCK_K % Q
        step_n, step_p = step_t // P, step_t % P
        ih_c = r * dil_h - pad_h
        iw_c = s * dil_w - pad_w
    for k0 in range(start, end, BLOCK_K):
        rows = k0 + offs_k
        # the k rows and the N*P*Q tail need masks only where the tiles do not divide them
        rows_in = rows < end
        a_mask = rows_in[None, :] & m_mask[:, None]
        # dy^T tile [k, rows]
        if DY_LINEAR:
            a_ptrs = dy_ptr + wide(k0, IDX64) * sdq + a_offs
        else:
            t_a, q_a = fast_divmod(rows, Q, q_mul, q_shift)
            n_a, p_a = fast_divmod(t_a, P, p_mul, p_shift)
            a_ptrs = dy_ptr + dy_k[:, None] + (wide(n_a, IDX64) * sdn + wide(p_a, IDX64) * sdp
                                               + wide(q_a, IDX64) * sdq)[None, :]
        if EVEN_NPQ and EVEN_M:
            a = tl.load(a_ptrs).to(op_ty)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(op_ty)
        if HAS_BIAS:
            bacc += tl.sum(a.to(tl.float32), axis=1)
        # x tile [rows, columns] of this tap
        if FLAT_N:
            t, q = fast_divmod(rows, Q, q_mul, q_shift)
            n, p = fast_divmod(t, P, p_mul, p_shift)
            ih = (p * stride_h - pad_h)[:, None] + (r * dil_h)[None, :]
            iw = (q * stride_w - pad_w)[:, None] + (s * dil_w)[None, :]
            b_mask = (rows_in[:, None] & n_mask[None, :]) & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            b_off = (wide(n, IDX64) * sxn)[:, None] + wide(ih, IDX64) * sxh + wide(iw, IDX64) * sxw + x_col[None, :]
        else:
            ih = p_b * stride_h + ih_c
            iw = q_b * stride_w + iw_c
            # 0 <= ih < H as one unsigned compare
            row_ok = (ih.to(tl.uint32) < H.to(tl.uint32)) & (iw.to(tl.uint32) < W.to(tl.uint32))
            if not EVEN_NPQ:
                row_ok = row_ok & rows_in
            x_row = tl.multiple_of(wide(n_b, IDX64) * sxn + wide(ih, IDX64) * sxh + wide(iw, IDX64) * sxw, X_ALIGN)
            b_off = x_row[:, None] + x_col[None, :]
            b_mask = row_ok[:, None]
            if not EVEN_N and not COLS_READABLE:
                b_mask = b_mask & n_mask[None, :]
            q_b += step_q
            carry = q_b >= Q
            q_b = tl.where(carry, q_b - Q, q_b)
            p_b += step_p + carry.to(tl.int32)
            carry = p_b >= P
            p_b = tl.where(carry, p_b - P, p_b)
            n_b += step_n + carry.to(tl.int32)
        b = tl.load(x_ptr + b_off, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    o_mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT:
        g_off = (wide(k_glob, IDX64) * sgk)[:, None] + wide(c * sgc + r * sgr + s * sgs, IDX64)[None, :]
        tl.store(gw_ptr + g_off, acc.to(gw_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partials in (k, r, s, c) order: [SPLIT, K, R, S, Cg]
        p_off = (k_glob.to(tl.int64) * (R * S * Cg))[:, None] + ((r * S + s) * Cg + c).to(tl.int64)[None, :]
        tl.store(part_ptr + split.to(tl.int64) * K * R * S * Cg + p_off, acc, mask=o_mask)
    if HAS_BIAS:
        if pid_n == 0:
            if DIRECT:
                tl.store(gb_ptr + k_glob, bacc.to(gb_ptr.dtype.element_ty), mask=m_mask)
            else:
                tl.store(bpart_ptr + split.to(tl.int64) * K + k_glob, bacc, mask=m_mask)


_conv2d_wgrad = triton.heuristics({
    "DIRECT": lambda a: split_for(a) == 1,
    "EVEN_M": lambda a: a["Kg"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Cg"] % a["BLOCK_N"] == 0,
    "EVEN_NPQ": lambda a: a["NPQ"] % a["BLOCK_K"] == 0,
})(_conv2d_wgrad_kernel)
_conv2d_wgrad_autotuned = triton.autotune(
    configs=_gpu_configs(),
    key=["NPQ", "Kg", "Cg", "R", "S", "stride_h", "stride_w", "FLAT_N", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_conv2d_wgrad)


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # [SPLIT, L] fp32 partials; L = K*R*S*Cg in (k, r, s, c) order
    out_ptr,  # [K, Cg, R, S] result, strides so*
    SPLIT, L, Cg, R, S,
    sok, soc, sor, sos,
    BLOCK_S: tl.constexpr,  # >= SPLIT: every split loaded at once, summed as a fixed tree
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    sp = tl.arange(0, BLOCK_S)
    v = tl.load(part_ptr + (sp.to(tl.int64) * L)[:, None] + offs[None, :], mask=(sp < SPLIT)[:, None] & mask[None, :],
                other=0.0)
    acc = tl.sum(v, axis=0)  # a fixed reduction order for a fixed BLOCK_S: bitwise reproducible
    c = offs % Cg
    t = offs // Cg
    s = t % S
    t = t // S
    r = t % R
    k = t // R
    tl.store(out_ptr + k * sok + c * soc + r * sor + s * sos, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs a wgrad launch aims for: two waves of the GPU (4 under the interpreter, so
    that small problems still take the split path)."""
    if INTERPRET:
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def use_flat_n(cg: int) -> bool:
    """Flatten (r, s, c) into the column index when input channels per group are too few to
    fill a 16-wide tile (depthwise convs; small-C convs off the stem path)."""
    return cg < 16


def _reduce(part: torch.Tensor, out: torch.Tensor, split: int, K: int, Cg: int, R: int, S: int, strides) -> None:
    """out[k, c, r, s] (through ``strides``) = the sum of the split partials, in a fixed order."""
    L = K * R * S * Cg
    block_s = triton.next_power_of_2(split)
    block = max(16, _REDUCE_BLOCK // block_s)
    _split_reduce_kernel[(triton.cdiv(L, block),)](
        part, out, split, L, Cg, R, S, *strides, BLOCK_S=block_s, BLOCK=block,
    )


def conv2d_wgrad(
    dy: torch.Tensor,
    x: torch.Tensor,
    *,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    need_bias: bool = False,
    relu_out: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    c: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
    weight_memory_format: torch.memory_format = torch.contiguous_format,
    split_k: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the wgrad kernel (and, for SPLIT > 1, the fixed-order split reduction).

    Args:
        dy (Tensor[N, K, P, Q]): gradient at the conv output, or the prologue's incoming
            gradient (see :func:`.conv_dgrad.conv2d_dgrad`: relu_out, y, a, b, c, mean; dy is
            materialised first).
        x (Tensor[N, C, H, W]): fp16/bf16/fp32 conv input; its dtype is the operands' and results'.
        weight_shape: (K, C/groups, R, S); stride, padding (top, bottom, left, right),
            dilation, groups: the forward conv's normalised geometry.
        need_bias: also return ``db[k] = sum(dy[:, k])``.
        allow_tf32: fp32 operands use TF32 tensor-core products (else IEEE fp32).
        weight_memory_format: memory format of the returned weight gradient.
        split_k: number of reduction splits, 1 to 64 (default: chosen for the tile that runs).

    Returns:
        (dW Tensor[K, C/groups, R, S], db Tensor[K] or None), in x's dtype.
    Raises:
        ValueError: y without b, c and mean; split_k out of range.
    """
    check_device(dy, "grad_output")
    K, Cg, R, S = weight_shape
    N, C, H, W = x.shape
    P, Q = dy.shape[2], dy.shape[3]
    Kg = K // groups
    dev = dy.device
    if split_k is not None and not 1 <= split_k <= MAX_SPLIT:
        raise ValueError(f"split_k: expected 1 to {MAX_SPLIT}, got {split_k}")
    gw = new_empty(weight_shape, x.dtype, dev, weight_memory_format)
    gb = new_empty((K,), x.dtype, dev) if need_bias else None
    NPQ = N * P * Q
    if NPQ == 0:  # empty batch: the sums are empty
        gw.zero_()
        if gb is not None:
            gb.zero_()
        return gw, gb
    if NPQ >= 2**31:
        raise ValueError(f"grad_output: N*P*Q = {NPQ} output pixels, expected fewer than 2**31")
    if a is not None:
        dy = materialize_dy(dy, relu_out, y, a, b, c, mean, x.dtype)
    is_stem = stem.applies(C, S, groups, dilation[1])
    out_w = gw
    if is_stem:  # the gradient of the packed R x 1 filters, unpacked below
        x = stem.pack_input(x, padding, S)
        Cg, H, W, S = x.shape[1], x.shape[2], x.shape[3], 1
        padding, dilation = (0, 0, 0, 0), (dilation[0], 1)
        out_w = new_empty((K, Cg, R, 1), gw.dtype, dev)
    flat_n = use_flat_n(Cg) and not is_stem  # (the stem's runs are contiguous: direct columns, masked)
    sdn, sdk, sdp, sdq = dy.stride()
    sxn, sxc, sxh, sxw = x.stride()
    dy_linear = sdp == Q * sdq and sdn == P * sdp
    # Each program's row offsets are sums of these multiples: their common power of two.
    x_align = pow2_alignment(sxn, stride[0] * sxh, padding[0] * sxh, stride[1] * sxw, padding[2] * sxw,
                             dilation[0] * sxh * (R > 1), dilation[1] * sxw * (S > 1))
    target, split_req = target_programs(dev), split_k or 0
    named = dict(NPQ=NPQ, Cg=Cg, Kg=Kg, K=K, R=R, S=S, FLAT_N=flat_n, target=target, split_req=split_req)
    interpret_cfg = interpreter_config(_INTERPRET_CONFIG, BLOCK_M=Kg, **({} if flat_n else dict(BLOCK_N=Cg)))
    max_split = max(split_for(dict(named, **cfg.kwargs)) for cfg in
                    ([triton.Config(interpret_cfg)] if INTERPRET else _gpu_configs()))
    part = new_empty((max_split, K, R, S, Cg), torch.float32, dev) if max_split > 1 else out_w
    bpart = new_empty((max_split, K), torch.float32, dev) if (need_bias and max_split > 1) else part
    args = (
        dy, x, out_w, gb if gb is not None else out_w, part, bpart,
        NPQ, H, W, P, Q, Cg, Kg, K, R, S,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *divmod_magic(Q), *divmod_magic(P), target, split_req,
        sdn, sdk, sdp, sdq, sxn, sxc, sxh, sxw, *out_w.stride(),
    )
    flags = dict(
        HAS_BIAS=need_bias,
        FLAT_N=flat_n,
        DY_LINEAR=dy_linear,
        IDX64=needs_int64(dy, x, out_w),
        X_ALIGN=x_align,
        C_VEC=pow2_alignment(Cg, cap=8),
        COLS_READABLE=is_stem,
        PRECISION="tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee",
        DOT_FP32=INTERPRET and x.dtype == torch.bfloat16,
    )

    def split_of(meta) -> int:
        return split_for(dict(named, **meta))

    def grid(meta):
        cols = triton.cdiv(R * S * Cg, meta["BLOCK_N"]) if flat_n else R * S * triton.cdiv(Cg, meta["BLOCK_N"])
        return (triton.cdiv(Kg, meta["BLOCK_M"]) * cols, groups, split_of(meta))

    with contextlib.nullcontext() if INTERPRET else torch.cuda.device(dev):
        if INTERPRET:
            _conv2d_wgrad[grid](*args, **flags, **interpret_cfg)
            split = split_of(interpret_cfg)
        else:
            _conv2d_wgrad_autotuned[grid](*args, **flags)
            split = split_of(_conv2d_wgrad_autotuned.best_config.kwargs)
        if split > 1:
            _reduce(part, out_w, split, K, Cg, R, S, out_w.stride())
            if need_bias:
                _reduce(bpart, gb, split, K, 1, 1, 1, (1, 0, 0, 0))
    if is_stem:
        stem.unpack_weight_grad(out_w, C, gw)
    return gw, gb
