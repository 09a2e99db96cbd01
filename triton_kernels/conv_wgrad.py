"""Implicit-GEMM conv2d weight gradient (wgrad) and bias gradient, with the fused dReLU/dBN
prologue of :mod:`.conv_dgrad`, deterministic split-K.

    dW[k, c, r, s] = sum_{n, p, q} dy[n, k, p, q] * x[n, c, p*stride_h - pad_top + r*dil_h, q*stride_w - pad_left + s*dil_w]
    db[k]          = sum_{n, p, q} dy[n, k, p, q]

GEMM view (per group): M = K/groups rows, N_gemm = (C/groups) * R * S columns, reduced over
N*P*Q. That reduction is long and the output small, so it is split into SPLIT contiguous
chunks (one grid axis): each program writes its fp32 partial tile to its own slice of a
[SPLIT, K, R, S, C/groups] buffer, and a second pass sums the slices in a fixed order —
no atomics, bitwise reproducible. With SPLIT == 1 the kernel stores the result directly.
The bias gradient is reduced from the same dy tiles by the programs of the first column tile.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, new_empty
from .conv_dgrad import load_dy_tile, tile_fits

_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
# Each split's chunk of N*P*Q is a multiple of every configuration's BLOCK_K.
_CHUNK_ALIGN = _INTERPRET_CONFIG["BLOCK_K"] if INTERPRET else 128
_REDUCE_BLOCK = 256 if INTERPRET else 1024


def _gpu_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 128, 32, 8, 3),  # 8 warps: room for the fp32 prologue math
        (128, 64, 64, 4, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 256, 32, 8, 3),
        (64, 64, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (64, 32, 64, 4, 4),
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
    and tiles that would not fit in registers (prologue dy tile, flat x gather)."""
    kg, cg = named_args["Kg"], named_args["Cg"]
    cols = cg * named_args["R"] * named_args["S"] if kwargs.get("FLAT_N") else cg
    max_bm = max(16, triton.next_power_of_2(kg))
    max_bn = max(16, triton.next_power_of_2(cols))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_bm and c.kwargs["BLOCK_N"] <= max_bn
            and (not kwargs.get("PROLOGUE", False) or tile_fits(c, "BLOCK_M", "BLOCK_K"))
            and (not kwargs.get("FLAT_N", False) or tile_fits(c, "BLOCK_K", "BLOCK_N"))]
    return kept or configs[-1:]


@triton.jit
def _conv2d_wgrad_kernel(
    dy_ptr,  # [N, K, P, Q] gradient at the conv output (PROLOGUE: the incoming gradient), strides sd*
    mo_ptr,  # [N, K, P, Q] forward output; its sign is the ReLU mask (RELU), strides sd*
    y_ptr,  # [N, K, P, Q] BatchNorm input (HAS_Y), strides sd*
    a_ptr, b_ptr, c_ptr, mean_ptr,  # [K] fp32 prologue coefficients (b, c, mean only with HAS_Y)
    x_ptr,  # [N, C, H, W] conv input, strides sx*
    gw_ptr,  # DIRECT: [K, C/groups, R, S] weight gradient; else [SPLIT, K, R, S, C/groups] fp32 partials; strides sg*
    gb_ptr,  # DIRECT: [K] bias gradient; else [SPLIT, K] fp32 partials (HAS_BIAS)
    NPQ, H, W, P, Q, Cg, Kg, K, R, S, chunk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdn, sdk, sdp, sdq,
    sxn, sxc, sxh, sxw,
    sgk, sgc, sgr, sgs, split_stride,
    PROLOGUE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_Y: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FLAT_N: tl.constexpr,  # columns are (r, s, c) flattened: for few input channels per group
    DIRECT: tl.constexpr,  # SPLIT == 1: store the final gradients in their dtype
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
        n_mask = c < Cg
    r = rs // S
    s = rs % S
    x_col = (grp * Cg + c).to(tl.int64) * sxc
    dy_k = k_glob.to(tl.int64) * sdk
    op_ty = x_ptr.dtype.element_ty

    start = split * chunk
    end = tl.minimum(start + chunk, NPQ)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        rows = k0 + offs_k
        r_mask = rows < end
        q = rows % Q
        t = rows // Q
        p = t % P
        n64 = (t // P).to(tl.int64)
        a_off = dy_k[:, None] + (n64 * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq)[None, :]
        a = load_dy_tile(dy_ptr, mo_ptr, y_ptr, a_ptr, b_ptr, c_ptr, mean_ptr, a_off, m_mask[:, None] & r_mask[None, :],
                         k_glob, m_mask, PROLOGUE, RELU, HAS_Y, 0).to(op_ty)
        if HAS_BIAS:
            bacc += tl.sum(a.to(tl.float32), axis=1)
        ih0 = p * stride_h - pad_h
        iw0 = q * stride_w - pad_w
        if FLAT_N:
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            b_mask = (r_mask[:, None] & n_mask[None, :]) & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            b_off = (n64 * sxn)[:, None] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw + x_col[None, :]
        else:
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            row_ok = r_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_off = (n64 * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + x_col[None, :]
            b_mask = row_ok[:, None] & n_mask[None, :]
        b = tl.load(x_ptr + b_off, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if FLAT_N:
        g_col = c * sgc + r * sgr + s * sgs
    else:
        g_col = c * sgc + (r * sgr + s * sgs)
    g_off = (k_glob.to(tl.int64) * sgk)[:, None] + g_col.to(tl.int64)[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT:
        tl.store(gw_ptr + g_off, acc.to(gw_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(gw_ptr + split.to(tl.int64) * split_stride + g_off, acc, mask=o_mask)
    if HAS_BIAS:
        if pid_n == 0:
            if DIRECT:
                tl.store(gb_ptr + k_glob, bacc.to(gb_ptr.dtype.element_ty), mask=m_mask)
            else:
                tl.store(gb_ptr + split.to(tl.int64) * K + k_glob, bacc, mask=m_mask)


_conv2d_wgrad_autotuned = triton.autotune(
    configs=_gpu_configs(),
    key=["NPQ", "Kg", "Cg", "R", "S", "chunk", "stride_h", "stride_w", "FLAT_N", "PROLOGUE", "RELU", "HAS_Y",
         "HAS_BIAS", "DIRECT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_conv2d_wgrad_kernel)


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # [SPLIT, L] fp32 partials; L = K*R*S*Cg in (k, r, s, c) order
    out_ptr,  # [K, Cg, R, S] result, strides so*
    SPLIT, L, Cg, R, S,
    sok, soc, sor, sos,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(0, SPLIT):  # fixed order: bitwise reproducible
        acc += tl.load(part_ptr + sp * L + offs, mask=mask, other=0.0)
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


def choose_split(npq: int, tiles: int, device: torch.device) -> int:
    """Split N*P*Q so that about two waves of programs fill the GPU, each split still long
    enough (>= 512 rows) to amortise its partial store and the second pass."""
    if INTERPRET:  # small problems: still exercise the split path
        target, min_chunk = 4, _CHUNK_ALIGN
    else:
        target, min_chunk = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()), 512
    return max(1, min(triton.cdiv(target, max(tiles, 1)), triton.cdiv(npq, min_chunk)))


def use_flat_n(cg: int) -> bool:
    """Flatten (r, s, c) into the column index when input channels per group are too few to
    fill a 16-wide tile (the RGB stem, depthwise convs)."""
    return cg < 16


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
            gradient (see :func:`.conv_dgrad.conv2d_dgrad`: relu_out, y, a, b, c, mean).
        x (Tensor[N, C, H, W]): fp16/bf16/fp32 conv input; its dtype is the operands' and results'.
        weight_shape: (K, C/groups, R, S); stride, padding (top, bottom, left, right),
            dilation, groups: the forward conv's normalised geometry.
        need_bias: also return ``db[k] = sum(dy[:, k])``.
        allow_tf32: fp32 operands use TF32 tensor-core products (else IEEE fp32).
        weight_memory_format: memory format of the returned weight gradient.
        split_k: number of reduction splits (default: chosen from the problem size).

    Returns:
        (dW Tensor[K, C/groups, R, S], db Tensor[K] or None), in x's dtype.
    """
    check_device(dy, "grad_output")
    K, Cg, R, S = weight_shape
    N, C, H, W = x.shape
    P, Q = dy.shape[2], dy.shape[3]
    Kg = K // groups
    dev = dy.device
    gw = new_empty(weight_shape, x.dtype, dev, weight_memory_format)
    gb = new_empty((K,), x.dtype, dev) if need_bias else None
    NPQ = N * P * Q
    if NPQ == 0:  # empty batch: the sums are empty
        gw.zero_()
        if gb is not None:
            gb.zero_()
        return gw, gb
    prologue = a is not None
    if prologue:
        fmt = torch.channels_last if dy.is_contiguous(memory_format=torch.channels_last) and not dy.is_contiguous() \
            else torch.contiguous_format
        if not dy.is_contiguous(memory_format=fmt):
            dy = dy.contiguous(memory_format=fmt)
        relu_out = None if relu_out is None else relu_out.contiguous(memory_format=fmt)
        y = None if y is None else y.contiguous(memory_format=fmt)
        f32 = lambda v: None if v is None else v.to(torch.float32).contiguous()  # noqa: E731
        a, b, c, mean = f32(a), f32(b), f32(c), f32(mean)
        if y is not None and (b is None or c is None or mean is None):
            raise ValueError("y: the dBN prologue needs b, c and mean with y")
    flat_n = use_flat_n(Cg)
    if split_k is None:
        cols = triton.cdiv(R * S * Cg, 128) if flat_n else R * S * triton.cdiv(Cg, 128)
        split_k = choose_split(NPQ, groups * triton.cdiv(Kg, 128) * cols, dev)
    chunk = triton.cdiv(triton.cdiv(NPQ, split_k), _CHUNK_ALIGN) * _CHUNK_ALIGN
    split = triton.cdiv(NPQ, chunk)  # no empty split
    direct = split == 1
    if direct:
        out_w, out_b = gw, gb
        g_strides = (gw.stride(0), gw.stride(1), gw.stride(2), gw.stride(3))
        split_stride = 0
    else:
        out_w = new_empty((split, K, R, S, Cg), torch.float32, dev)
        out_b = new_empty((split, K), torch.float32, dev) if need_bias else None
        g_strides = (R * S * Cg, 1, S * Cg, Cg)
        split_stride = K * R * S * Cg
    dummy = out_w
    args = (
        dy,
        relu_out if relu_out is not None else dummy,
        y if y is not None else dummy,
        a if prologue else dummy,
        b if b is not None else dummy,
        c if c is not None else dummy,
        mean if mean is not None else dummy,
        x, out_w, out_b if out_b is not None else dummy,
        NPQ, H, W, P, Q, Cg, Kg, K, R, S, chunk,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *dy.stride(), *x.stride(), *g_strides, split_stride,
    )
    flags = dict(
        PROLOGUE=prologue,
        RELU=prologue and relu_out is not None,
        HAS_Y=prologue and y is not None,
        HAS_BIAS=need_bias,
        FLAT_N=flat_n,
        DIRECT=direct,
        PRECISION="tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee",
        DOT_FP32=INTERPRET and x.dtype == torch.bfloat16,
    )

    def grid(meta):
        cols = triton.cdiv(R * S * Cg, meta["BLOCK_N"]) if flat_n else R * S * triton.cdiv(Cg, meta["BLOCK_N"])
        return (triton.cdiv(Kg, meta["BLOCK_M"]) * cols, groups, split)

    with contextlib.nullcontext() if INTERPRET else torch.cuda.device(dev):
        if INTERPRET:
            _conv2d_wgrad_kernel[grid](*args, **flags, **_INTERPRET_CONFIG)
        else:
            _conv2d_wgrad_autotuned[grid](*args, **flags)
        if not direct:
            L = K * R * S * Cg
            _split_reduce_kernel[(triton.cdiv(L, _REDUCE_BLOCK),)](
                out_w, gw, split, L, Cg, R, S, *gw.stride(), BLOCK=_REDUCE_BLOCK,
            )
            if need_bias:
                _split_reduce_kernel[(triton.cdiv(K, _REDUCE_BLOCK),)](
                    out_b, gb, split, K, 1, 1, 1, 1, 0, 0, 0, BLOCK=_REDUCE_BLOCK,
                )
    return gw, gb
