"""Implicit-GEMM conv2d input gradient (dgrad), with an optional fused dReLU/dBN prologue.

    dx[n, c, h, w] = sum_{k, r, s} dy[n, k, p, q] * W[k, c, r, s],
    h + pad_top = p * stride_h + r * dil_h,   w + pad_left = q * stride_w + s * dil_w.

GEMM view (per group): M = N*H*W rows (input pixels), N_gemm = C/groups columns,
K_gemm = (K/groups) * taps. The dy tile is gathered on the fly; nothing is zero-inserted.

Strides > 1: an input row h only receives taps r with ``r*dil_h = (h + pad_top) mod stride_h``.
The rows are therefore split by phase ``a = (h + pad_top) mod stride_h`` (columns alike); one
grid axis runs over the stride_h * stride_w phases and each program visits only the taps of
its phase (the same remapping as CUTLASS's strided dgrad, extended to dilation): with
``g = gcd(dil_h, stride_h)`` the phase has taps only if g divides a, namely
``r = r0 + j * (stride_h / g)``, and tap j of row ``h = h0 + i * stride_h`` reads output row
``p = i + p_base - j * (dil_h / g)``. Stride 1 is the single phase with every tap. The phase
parameters are computed in the kernel from a few scalars (no host-to-device table, so
launches stay CUDA-graph capturable).

Main loop: the rows' offsets at the phase's first tap and, for up to 32 taps per phase, the
taps each row may read (``_index.tap_bits``) are computed once per tile; a step adds a scalar
offset and ANDs one bit (no division, no per-row 64-bit arithmetic in the loop).

The dReLU/dBN prologue ``dy = a[k] * where(out <= 0, 0, g) + b[k] * (y - mean[k]) + c[k]`` is
applied by materialising dy first (``elementwise.bn_backward_dy``, one pass, rounded to the
filters' dtype), never inside the loads: formed in the loads it was recomputed for every tap
and every tile of the other GEMM dimension, and it kept the tensor cores' A operand in
registers; ``resconv inspect`` measured those main loops at 7-9x a plain matmul's
(benchmarks/results/static-sm90), while the extra pass moves the same compulsory bytes as
reading g, out and y in both dgrad and wgrad.
"""
from __future__ import annotations

from math import gcd
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, check_device, descriptor_2d, device_function, interpreter_config, new_empty, set_blocks, tma_available,
)
from ._index import as_row_tile, axis_bits, needs_int64, tap_bits, tap_bits_fit, wide
from .conv_fprop import every_block_divides, pow2_alignment
from .elementwise import bn_backward_dy

# Under the interpreter one small fixed configuration (valid on a GPU too: tl.dot dims >= 16,
# powers of two); on the GPU the autotuner picks per shape.
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)
# The filter tile the TMA descriptor loads: [BLOCK_K output channels, BLOCK_N input channels].
_DESC_BLOCKS = set_blocks(w_desc=("BLOCK_K", "BLOCK_N"))


def _gpu_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 32, 4, 4),
        (64, 16, 32, 2, 4),
        (64, 16, 16, 4, 4),  # few channels per group (depthwise)
    ]:
        cfgs.append(
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages,
                          pre_hook=_DESC_BLOCKS)
        )
    return cfgs


def tile_fits(cfg, rows: str, cols: str) -> bool:
    """A tile gathered with per-element 2-D offsets and masks (the flat modes) must keep at
    most 32 elements per thread in registers, or the kernel spills (seen in sm_80/sm_90
    compiles of 128x64 tiles on 4 warps; resconv inspect)."""
    return cfg.kwargs[rows] * cfg.kwargs[cols] <= 32 * 32 * cfg.num_warps


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far wider than the problem (few channels per group): they only waste work;
    tiles narrower than 64 where the problem is that wide (small tensor-core instructions,
    more index math per product); and flat-gathered dy tiles that would not fit in registers."""
    cg, kg = named_args["Cg"], named_args["Kg"]
    red = kg * named_args["max_taps"] if kwargs.get("FLAT_K") else kg
    max_bn = max(16, triton.next_power_of_2(cg))
    max_bk = max(16, triton.next_power_of_2(red))
    min_bn = min(64, max_bn)
    kept = [c for c in configs if min_bn <= c.kwargs["BLOCK_N"] <= max_bn and c.kwargs["BLOCK_K"] <= max_bk
            and (not kwargs.get("FLAT_K", False) or tile_fits(c, "BLOCK_M", "BLOCK_K"))]
    return kept or configs[-1:]


@device_function
def _phase(a, size, pad, stride, dil, taps, g, tap_step, inv):
    """Phase a of one spatial axis (see the module docstring): (first input position, count,
    first tap, number of taps, output-position base)."""
    h0 = (a - pad % stride + stride) % stride
    count = (size - h0 + stride - 1) // stride  # size - h0 > -stride: never negative
    has = (a % g) == 0
    r0 = ((a // g) * inv) % tap_step
    n_taps = tl.where(has & (r0 < taps), (taps - r0 + tap_step - 1) // tap_step, 0)
    base = (h0 + pad - r0 * dil) // stride  # exact when n_taps > 0 (r0*dil = h0 + pad mod stride)
    return h0, count, r0, n_taps, base


@triton.jit(do_not_specialize=["N", "H", "W", "P", "Q", "M_max", "stride_h", "stride_w", "pad_h", "pad_w",
                               "dil_h", "dil_w", "g_h", "g_w", "r_step", "s_step", "inv_h", "inv_w", "dp", "dq"])
def _conv2d_dgrad_kernel(
    dy_ptr,  # [N, K, P, Q] gradient at the conv output, strides sd*
    w_ptr,  # [K, C/groups, R, S] filters, strides sw*
    w_desc,  # W_TMA: TMA descriptor over the channels-last filters as [K, R*S*C/groups]; else unused
    dx_ptr,  # [N, C, H, W] input gradient (written), strides sx*
    N, H, W, P, Q, Cg, Kg, R, S, M_max, max_taps,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    g_h, g_w, r_step, s_step, inv_h, inv_w, dp, dq,  # see phase_params()
    sdn, sdk, sdp, sdq,
    swk, swc, swr, sws,
    sxn, sxc, sxh, sxw,
    FLAT_K: tl.constexpr,  # reduce over (tap, k) flattened: for few output channels per group
    TAP_BITS: tl.constexpr,  # at most 32 taps per phase: per-row tap masks precomputed as bits
    IDX64: tl.constexpr,  # 64-bit element offsets (a tensor reaches 2**31 elements)
    DY_ALIGN: tl.constexpr,  # every dy row offset and tap step is a multiple of this (elements)
    W_ALIGN: tl.constexpr,  # every filter row offset and tap step is a multiple of this
    W_TMA: tl.constexpr,  # filter tiles by TMA (w_desc): every BLOCK_K divides K/groups
    K_VEC: tl.constexpr,  # a power of two dividing K/groups (<= 8): the channel mask's vector width
    EVEN_K: tl.constexpr,  # BLOCK_K divides K/groups: no channel mask (a heuristic of the config)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32" or "ieee"
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, so multiply exact fp32 copies
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // stride_w
    pw = phase % stride_w
    h0, rows_h, r0, n_r, p_base = _phase(ph, H, pad_h, stride_h, dil_h, R, g_h, r_step, inv_h)
    w0, cols_w, s0, n_s, q_base = _phase(pw, W, pad_w, stride_w, dil_w, S, g_w, s_step, inv_w)
    M = N * rows_h * cols_w  # this phase's rows; the grid is sized for the largest phase

    # Grouped tile order: GROUP_M row tiles share each column tile's filters in L2.
    num_pid_m = tl.cdiv(M_max, BLOCK_M)
    num_pid_n = tl.cdiv(Cg, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    cw = tl.maximum(cols_w, 1)  # an empty phase (M == 0) must not divide by zero
    rh = tl.maximum(rows_h, 1)
    j = offs_m % cw
    t = offs_m // cw
    i = t % rh
    n = t // rh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cg
    c_glob = grp * Cg + offs_n
    offs_k = tl.arange(0, BLOCK_K)
    w_col = wide(offs_n, IDX64) * swc  # the filters hold in-group channels

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        dy_row = wide(n, IDX64) * sdn
        KT = n_r * n_s * Kg
        for k0 in range(0, KT, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < KT
            kc = kk % Kg
            tap = kk // Kg
            jr = tap // n_s  # KT > 0 here, so n_s > 0
            js = tap % n_s
            p = i[:, None] + (p_base - jr * dp)[None, :]
            q = j[:, None] + (q_base - js * dq)[None, :]
            k_glob = grp * Kg + kc
            a_mask = (m_mask[:, None] & k_mask[None, :]) & ((p >= 0) & (p < P) & (q >= 0) & (q < Q))
            a_off = dy_row[:, None] + wide(p, IDX64) * sdp + wide(q, IDX64) * sdq + wide(k_glob * sdk, IDX64)[None, :]
            a = tl.load(dy_ptr + a_off, mask=a_mask, other=0.0)
            r = r0 + jr * r_step
            s = s0 + js * s_step
            b_off = wide(k_glob * swk + r * swr + s * sws, IDX64)[:, None] + w_col[None, :]
            b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # One tap of this phase and one chunk of output channels per step, in one flat loop
        # (Triton pipelines it). Per row, once: the dy offset of the phase's first tap (it may
        # lie outside dy: only read under the tap's mask) and, with TAP_BITS, which taps read
        # inside dy. A step adds a scalar offset and ANDs one bit.
        p0 = i + p_base
        q0 = j + q_base
        dy_row = tl.multiple_of(wide(n, IDX64) * sdn + wide(p0, IDX64) * sdp + wide(q0, IDX64) * sdq
                                + wide(grp * Kg, IDX64) * sdk, DY_ALIGN)
        a_offs = dy_row[:, None] + (offs_k * sdk)[None, :]
        b_offs = tl.multiple_of(wide(r0, IDX64) * swr + wide(s0, IDX64) * sws + wide(grp * Kg, IDX64) * swk,
                                W_ALIGN) + (wide(offs_k, IDX64) * swk)[:, None] + w_col[None, :]
        if TAP_BITS:
            rows_ok = tap_bits(axis_bits(p0, -dp, n_r, P), axis_bits(q0, -dq, n_s, Q), n_r, n_s)
            rows_ok = as_row_tile(tl.where(m_mask, rows_ok, 0), offs_k, Kg, BLOCK_K)
        n_kb = tl.cdiv(Kg, BLOCK_K)
        jr = 0
        js = 0
        kb = 0
        bit = 1
        for _ in range(0, n_r * n_s * n_kb):
            dy_step = tl.multiple_of(wide(kb * BLOCK_K, IDX64) * sdk - wide(jr * dp, IDX64) * sdp
                                     - wide(js * dq, IDX64) * sdq, DY_ALIGN)
            w_step = tl.multiple_of(wide(kb * BLOCK_K, IDX64) * swk + wide(jr * r_step, IDX64) * swr
                                    + wide(js * s_step, IDX64) * sws, W_ALIGN)
            if TAP_BITS:
                a_mask = (rows_ok & bit) != 0
            else:
                p = p0 - jr * dp
                q = q0 - js * dq
                a_mask = (m_mask & (p >= 0) & (p < P) & (q >= 0) & (q < Q))[:, None]
            if W_TMA:  # columns past the group's channels are never stored
                a = tl.load(dy_ptr + dy_step + a_offs, mask=a_mask, other=0.0)
                tap = (r0 + jr * r_step) * S + s0 + js * s_step
                b = w_desc.load([grp * Kg + kb * BLOCK_K, tap * Cg + pid_n * BLOCK_N])
            elif EVEN_K:
                a = tl.load(dy_ptr + dy_step + a_offs, mask=a_mask, other=0.0)
                b = tl.load(w_ptr + w_step + b_offs, mask=n_mask[None, :], other=0.0)
            else:
                k_ok = (kb * BLOCK_K + offs_k) // K_VEC < Kg // K_VEC  # constant along each K_VEC vector
                a = tl.load(dy_ptr + dy_step + a_offs, mask=a_mask & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + w_step + b_offs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            a = a.to(w_ptr.dtype.element_ty)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            # next (jr, js, channel block) without a division: kb fastest, then js, then jr
            kb += 1
            next_tap = kb == n_kb
            kb = tl.where(next_tap, 0, kb)
            js = tl.where(next_tap, js + 1, js)
            bit = tl.where(next_tap, bit << 1, bit)
            next_row = js == n_s
            js = tl.where(next_row, 0, js)
            jr = tl.where(next_row, jr + 1, jr)

    h = h0 + i * stride_h
    w = w0 + j * stride_w
    x_off = (wide(n, IDX64) * sxn + wide(h, IDX64) * sxh + wide(w, IDX64) * sxw)[:, None] \
        + wide(c_glob * sxc, IDX64)[None, :]
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_conv2d_dgrad = triton.heuristics({"EVEN_K": lambda a: a["Kg"] % a["BLOCK_K"] == 0})(_conv2d_dgrad_kernel)
_conv2d_dgrad_autotuned = triton.autotune(
    configs=_gpu_configs(),
    key=["M_max", "Cg", "Kg", "max_taps", "P", "Q", "stride_h", "stride_w", "FLAT_K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_conv2d_dgrad)


def phase_params(stride: int, dil: int) -> tuple[int, int, int, int]:
    """(g, tap_step, inv, out_step) of one axis: ``g = gcd(dil, stride)``; a phase's taps are
    ``tap_step = stride/g`` apart and its output positions ``out_step = dil/g`` apart; ``inv``
    is the inverse of dil/g modulo tap_step, so the first tap of phase a is
    ``(a/g) * inv mod tap_step``."""
    g = gcd(dil, stride)
    tap_step, out_step = stride // g, dil // g
    inv = pow(out_step, -1, tap_step) if tap_step > 1 else 0
    return g, tap_step, inv, out_step


def materialize_dy(g: torch.Tensor, relu_out, y, a, b, c, mean, dtype: torch.dtype) -> torch.Tensor:
    """``dy = a[k] * where(relu_out <= 0, 0, g) + b[k] * (y - mean[k]) + c[k]`` as a tensor of
    ``dtype`` (fp32 math, one rounding; the ReLU mask and the y terms optional), in the layout
    of relu_out (or y, or g). Raises ValueError for y without b, c and mean."""
    if y is not None and (b is None or c is None or mean is None):
        raise ValueError("y: the dBN prologue needs b, c and mean with y")
    f32 = lambda v: None if v is None else v.to(torch.float32).contiguous()  # noqa: E731
    dy, _ = bn_backward_dy(g, relu_out, y, a=f32(a), b=f32(b), c=f32(c), mean=f32(mean), relu=relu_out is not None,
                           want_grad_residual=False, dy_dtype=dtype)
    return dy


def use_flat_k(kg: int) -> bool:
    """Flatten (tap, k) into one reduction index when output channels per group are too few
    to fill a 16-wide reduction tile (depthwise convs, tiny heads)."""
    return kg < 16


def conv2d_dgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    *,
    input_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    relu_out: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    c: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
    out_memory_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
    """Launch the dgrad kernel: the gradient of ``conv2d(x, weight)`` with respect to x.

    Args:
        dy (Tensor[N, K, P, Q]): the gradient at the conv output; with ``a`` given, the
            incoming gradient g of the prologue ``dy = a*where(relu_out <= 0, 0, g) + b*(y - mean) + c``
            (materialised first: :func:`materialize_dy`). Any float dtype; read through its strides.
        weight (Tensor[K, C/groups, R, S]): fp16/bf16/fp32; its dtype is the operands' and dx's.
        input_shape: (N, C, H, W) of x; stride, padding (top, bottom, left, right), dilation,
            groups: the forward conv's normalised geometry.
        relu_out (Tensor[N, K, P, Q] or None): forward output whose sign masks g (prologue only).
        y (Tensor[N, K, P, Q] or None): BatchNorm input, with b, c, mean (prologue only).
        a, b, c, mean (Tensor[K] fp32 or None): prologue coefficients.
        allow_tf32: fp32 operands use TF32 tensor-core products (else IEEE fp32).
        out_memory_format: torch.channels_last or torch.contiguous_format for dx.

    Returns:
        dx (Tensor[N, C, H, W]) in weight's dtype and ``out_memory_format``.
    Raises:
        ValueError: y without b, c and mean.
    """
    check_device(dy, "grad_output")
    N, C, H, W = input_shape
    K, Cg, R, S = weight.shape
    Kg = K // groups
    P, Q = dy.shape[2], dy.shape[3]
    dx = new_empty(input_shape, weight.dtype, dy.device, out_memory_format)
    if dx.numel() == 0:
        return dx
    weight = weight if weight.is_contiguous(memory_format=torch.channels_last) else weight.contiguous(
        memory_format=torch.channels_last)
    if a is not None:
        dy = materialize_dy(dy, relu_out, y, a, b, c, mean, weight.dtype)
    g_h, r_step, inv_h, dp = phase_params(stride[0], dilation[0])
    g_w, s_step, inv_w, dq = phase_params(stride[1], dilation[1])
    # The largest phase has ceil(H / stride) rows; the largest tap set ceil(R / tap_step) taps.
    M_max = N * triton.cdiv(H, stride[0]) * triton.cdiv(W, stride[1])
    max_taps = triton.cdiv(R, r_step) * triton.cdiv(S, s_step)
    sdn, sdk, sdp, sdq = dy.stride()
    swk, swc, swr, sws = weight.stride()
    w_desc = None
    if not use_flat_k(Kg) and every_block_divides(Kg) and tma_available(dy.device):
        w_desc = descriptor_2d(weight.permute(0, 2, 3, 1).reshape(K, R * S * Cg))
    args = (
        dy, weight, w_desc if w_desc is not None else weight, dx,
        N, H, W, P, Q, Cg, Kg, R, S, M_max, max_taps,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        g_h, g_w, r_step, s_step, inv_h, inv_w, dp, dq,
        sdn, sdk, sdp, sdq, swk, swc, swr, sws, *dx.stride(),
    )
    flags = dict(
        FLAT_K=use_flat_k(Kg),
        TAP_BITS=tap_bits_fit(max_taps),
        IDX64=needs_int64(dy, weight, dx),
        # dy row offsets and tap steps are sums of these multiples: their common power of two
        DY_ALIGN=pow2_alignment(sdn, sdp, sdq, Kg * sdk * (groups > 1)),
        W_ALIGN=pow2_alignment(swk, swr * (R > 1), sws * (S > 1)),
        W_TMA=w_desc is not None,
        K_VEC=pow2_alignment(Kg, cap=8),
        PRECISION="tf32" if (allow_tf32 and weight.dtype == torch.float32) else "ieee",
        DOT_FP32=INTERPRET and weight.dtype == torch.bfloat16,
    )

    def grid(meta):
        return (triton.cdiv(M_max, meta["BLOCK_M"]) * triton.cdiv(Cg, meta["BLOCK_N"]), groups, stride[0] * stride[1])

    if INTERPRET:  # (TMA only where a test forces it: tma_available is False here)
        cfg = interpreter_config(_INTERPRET_CONFIG, BLOCK_N=Cg, BLOCK_K=Kg)
        if w_desc is not None:
            _DESC_BLOCKS(dict(w_desc=w_desc, **cfg))
        _conv2d_dgrad[grid](*args, **flags, **cfg)
    else:
        with torch.cuda.device(dy.device):
            _conv2d_dgrad_autotuned[grid](*args, **flags)
    return dx
