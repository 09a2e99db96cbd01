"""BatchNorm statistics kernels: forward finalize, running-statistics update, backward
reductions. All reductions run in a fixed order (no atomics), so results are bitwise
reproducible run to run.

Forward: the conv kernel leaves per-tile moments (count, mean, M2) of each channel;
``bn_finalize`` merges them with Chan et al.'s pairwise formula (Chan, Golub & LeVeque 1979)
— never E[y^2] - E[y]^2 — into mean, 1/sqrt(var + eps), the unbiased variance, and the
apply coefficients ``a = gamma * invstd``, ``b = beta - mean * a``.

Backward: ``bn_backward_reduce`` gives per-channel ``sum(g)`` and ``sum(g * (y - mean))``
(g = grad_out masked by ReLU) and the coefficients of ``dy = a*g + b*(y - mean) + c``.

Both merge their T partials as a tree: each level's programs merge BLOCK_T consecutive
partials of BLOCK_C channels with ``tl.reduce`` (a fixed combination order) into one, in
parallel over (T / BLOCK_T, K / BLOCK_C) programs, until at most BLOCK_T remain for the last
level, which also writes the results. Never a handful of programs walking every partial.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, new_empty, nkl_strides, device_function

_BLOCK_C = 32 if INTERPRET else 64
# Partials merged per program and tree level (small under the interpreter, so that the tests'
# few partials still go through several levels); channels per program of a tree's last
# level (small: a 64-channel layer still gets several programs).
_BLOCK_T = 4 if INTERPRET else 128
_BLOCK_C_LAST = 16
_BLOCK_R = 64 if INTERPRET else 128


@triton.jit  # a tl.reduce combine function: the interpreter needs the JIT object
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    d = mean_b - mean_a
    return mean_a + d * w_b, m2_a + m2_b + d * d * n_a * w_b, n


@device_function
def _merge_block(cnt_ptr, pmean_ptr, pm2_ptr, pivot, offs_t, offs_c, T, K):
    """(count, mean - pivot, M2) of partials offs_t (< T) of channels offs_c, merged in a fixed order."""
    tm = offs_t < T
    cm = offs_c < K
    n = tl.load(cnt_ptr + offs_t, mask=tm, other=0.0)
    n2 = n[:, None] + tl.zeros((offs_t.shape[0], offs_c.shape[0]), dtype=tl.float32)
    off = offs_t.to(tl.int64)[:, None] * K + offs_c[None, :]
    m2d = tm[:, None] & cm[None, :]
    mu = tl.where(m2d, tl.load(pmean_ptr + off, mask=m2d, other=0.0) - pivot[None, :], 0.0)
    m2 = tl.load(pm2_ptr + off, mask=m2d, other=0.0)
    return tl.reduce((mu, m2, n2), 0, _chan_combine)


@triton.jit
def _chan_merge_kernel(
    cnt_ptr,  # [T] fp32 rows per partial
    pmean_ptr,  # [T, K] fp32 partial means (relative to the pivot unless SUB_PIVOT)
    pm2_ptr,  # [T, K] fp32 partial M2
    pivot_ptr,  # [K] fp32 row 0 of the first level's means (SUB_PIVOT)
    ocnt_ptr, omean_ptr, om2_ptr,  # [ceil(T / BLOCK_T)], [ceil(T / BLOCK_T), K] x 2: merged (written)
    T, K,
    SUB_PIVOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tree level: partials [t*BLOCK_T, (t+1)*BLOCK_T) merged into partial t."""
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < K
    pivot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if SUB_PIVOT:
        pivot = tl.load(pivot_ptr + offs_c, mask=cm, other=0.0)
    c_mean, c_m2, c_n = _merge_block(cnt_ptr, pmean_ptr, pm2_ptr, pivot, offs_t, offs_c, T, K)
    tl.store(omean_ptr + pid_t.to(tl.int64) * K + offs_c, c_mean, mask=cm)
    tl.store(om2_ptr + pid_t.to(tl.int64) * K + offs_c, c_m2, mask=cm)
    if tl.program_id(1) == 0:
        tl.store(ocnt_ptr + pid_t, tl.max(c_n, axis=0))  # every channel has the same count


@triton.jit
def _bn_finalize_kernel(
    cnt_ptr,  # [T] fp32 rows per partial, T <= BLOCK_T
    pmean_ptr,  # [T, K] fp32 partial means (relative to the pivot unless SUB_PIVOT)
    pm2_ptr,  # [T, K] fp32 partial M2
    pivot_ptr,  # [K] fp32 row 0 of the first level's means
    w_ptr,  # [K] gamma (HAS_WEIGHT)
    b_ptr,  # [K] beta (HAS_BIAS)
    mean_ptr, invstd_ptr, var_ptr, a_ptr, sh_ptr,  # [K] fp32 outputs
    T, K, eps,
    SUB_PIVOT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The tree's last level: the remaining partials merged, the statistics written."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < K
    # The partial means are merged relative to the first one (a pivot): with a large common
    # offset the merged values stay small, so each merge step rounds at their scale, not the
    # offset's. (A rank with no rows as the first partial makes the pivot 0: correct, only
    # without that gain.)
    pivot = tl.load(pivot_ptr + offs_c, mask=cm & (T > 0), other=0.0)
    sub = pivot if SUB_PIVOT else tl.zeros((BLOCK_C,), dtype=tl.float32)
    run_mean, run_m2, run_n = _merge_block(cnt_ptr, pmean_ptr, pm2_ptr, sub, tl.arange(0, BLOCK_T), offs_c, T, K)
    run_mean = pivot + run_mean
    var = run_m2 / run_n
    invstd = 1.0 / tl.sqrt(var + eps)
    var_unbiased = run_m2 / tl.maximum(run_n - 1.0, 1.0)
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + offs_c, mask=cm, other=1.0).to(tl.float32)
    sh = -run_mean * a
    if HAS_BIAS:
        sh += tl.load(b_ptr + offs_c, mask=cm, other=0.0).to(tl.float32)
    tl.store(mean_ptr + offs_c, run_mean, mask=cm)
    tl.store(invstd_ptr + offs_c, invstd, mask=cm)
    tl.store(var_ptr + offs_c, var_unbiased, mask=cm)
    tl.store(a_ptr + offs_c, a, mask=cm)
    tl.store(sh_ptr + offs_c, sh, mask=cm)


def bn_finalize(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Merge partial moments into batch statistics and apply coefficients.

    Args:
        count (Tensor[T] fp32), mean (Tensor[T, K] fp32), m2 (Tensor[T, K] fp32): partials
            (conv-kernel tiles, or one row per rank for synchronized BatchNorm).
        weight, bias (Tensor[K] or None): gamma and beta.
        eps: added to the biased variance.
    Returns:
        (mean, invstd, var_unbiased, a, b), each Tensor[K] fp32, with
        ``a = gamma * invstd`` and ``b = beta - mean * a``.
    """
    check_device(mean, "mean")
    T, K = mean.shape
    outs = [new_empty((K,), torch.float32, mean.device) for _ in range(5)]
    dummy = outs[0]
    pivot = mean[0] if T > 0 else dummy
    first = True
    while T > _BLOCK_T:  # tree levels: BLOCK_T partials into one, all in parallel
        T2 = triton.cdiv(T, _BLOCK_T)
        merged = (new_empty((T2,), torch.float32, mean.device), new_empty((T2, K), torch.float32, mean.device),
                  new_empty((T2, K), torch.float32, mean.device))
        _chan_merge_kernel[(T2, triton.cdiv(K, _BLOCK_C))](
            count, mean, m2, pivot, *merged, T, K, SUB_PIVOT=first, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
        )
        (count, mean, m2), T, first = merged, T2, False
    _bn_finalize_kernel[(triton.cdiv(K, _BLOCK_C_LAST),)](
        count, mean, m2, pivot,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        *outs, T, K, float(eps),
        SUB_PIVOT=first, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C_LAST,
    )
    return tuple(outs)


@triton.jit
def _running_stats_kernel(
    rmean_ptr,  # [K] running_mean, updated in place (HAS_MEAN)
    rvar_ptr,  # [K] running_var, updated in place (HAS_VAR)
    mean_ptr,  # [K] fp32 batch mean
    var_ptr,  # [K] fp32 batch variance, unbiased
    K, momentum,
    HAS_MEAN: tl.constexpr,
    HAS_VAR: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < K
    if HAS_MEAN:
        old = tl.load(rmean_ptr + offs, mask=m, other=0.0).to(tl.float32)
        new = old * (1.0 - momentum) + tl.load(mean_ptr + offs, mask=m, other=0.0) * momentum
        tl.store(rmean_ptr + offs, new.to(rmean_ptr.dtype.element_ty), mask=m)
    if HAS_VAR:
        old = tl.load(rvar_ptr + offs, mask=m, other=0.0).to(tl.float32)
        new = old * (1.0 - momentum) + tl.load(var_ptr + offs, mask=m, other=0.0) * momentum
        tl.store(rvar_ptr + offs, new.to(rvar_ptr.dtype.element_ty), mask=m)


def update_running_stats_(
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    mean: torch.Tensor,
    var_unbiased: torch.Tensor,
    momentum: float,
) -> None:
    """torch.nn.BatchNorm2d's update, in place: ``running = (1 - momentum) * running + momentum * batch``.

    Args:
        running_mean, running_var (Tensor[K] or None, contiguous, any float dtype): mutated.
        mean, var_unbiased (Tensor[K] fp32): batch statistics.
    """
    if running_mean is None and running_var is None:
        return
    K = mean.shape[0]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor to update in place")
    _running_stats_kernel[(triton.cdiv(K, _BLOCK_C),)](
        running_mean if running_mean is not None else mean,
        running_var if running_var is not None else mean,
        mean, var_unbiased, K, float(momentum),
        HAS_MEAN=running_mean is not None, HAS_VAR=running_var is not None, BLOCK_C=_BLOCK_C,
    )


@triton.jit
def _bn_backward_partials_kernel(
    gout_ptr,  # [N, K, L] incoming gradient, strides sg*
    out_ptr,  # [N, K, L] forward output for the ReLU mask (RELU), strides so*
    y_ptr,  # [N, K, L] pre-BN values (HAS_Y), strides sy*
    mean_ptr,  # [K] fp32 (HAS_Y)
    psum_ptr,  # [T, K] fp32 partial sum(g)
    psumy_ptr,  # [T, K] fp32 partial sum(g * (y - mean)) (HAS_Y)
    g_ptr,  # [N, K, L] g itself, written (WRITE_G), strides sg* (those of gout)
    NL, K, L,
    sgn, sgk, sgl, son, sok, sol, syn, syk, syl,
    RELU: tl.constexpr,
    HAS_Y: tl.constexpr,
    WRITE_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = offs_r < NL
    cm = offs_c < K
    mask = rm[:, None] & cm[None, :]
    n = (offs_r // L).to(tl.int64)
    l = (offs_r % L).to(tl.int64)
    c64 = offs_c.to(tl.int64)
    g_off = (n * sgn + l * sgl)[:, None] + (c64 * sgk)[None, :]
    g = tl.load(gout_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + (n * son + l * sol)[:, None] + (c64 * sok)[None, :], mask=mask, other=0.0)
        g = tl.where(o <= 0, 0.0, g)  # NaN out passes g (threshold_backward)
    if WRITE_G:  # the residual's gradient, from the same pass
        tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(psum_ptr + pid_r.to(tl.int64) * K + offs_c, tl.sum(g, axis=0), mask=cm)
    if HAS_Y:
        y = tl.load(y_ptr + (n * syn + l * syl)[:, None] + (c64 * syk)[None, :], mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + offs_c, mask=cm, other=0.0)
        gy = tl.where(mask, g * (y - mu[None, :]), 0.0)
        tl.store(psumy_ptr + pid_r.to(tl.int64) * K + offs_c, tl.sum(gy, axis=0), mask=cm)


@triton.jit
def _sum_merge_kernel(
    psum_ptr,  # [T, K] fp32 partial sums
    psumy_ptr,  # [T, K] fp32 (HAS_Y)
    osum_ptr, osumy_ptr,  # [ceil(T / BLOCK_T), K] fp32: merged (written)
    T, K,
    HAS_Y: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tree level: partial sums [t*BLOCK_T, (t+1)*BLOCK_T) added, in a fixed order, into row t."""
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < K
    off = offs_t.to(tl.int64)[:, None] * K + offs_c[None, :]
    m = (offs_t < T)[:, None] & cm[None, :]
    dst = pid_t.to(tl.int64) * K + offs_c
    tl.store(osum_ptr + dst, tl.sum(tl.load(psum_ptr + off, mask=m, other=0.0), axis=0), mask=cm)
    if HAS_Y:
        tl.store(osumy_ptr + dst, tl.sum(tl.load(psumy_ptr + off, mask=m, other=0.0), axis=0), mask=cm)


def bn_backward_reduce(
    grad_out: torch.Tensor,
    out: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    *,
    relu: bool,
    g_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-channel ``sum(g)`` and ``sum(g * (y - mean))`` with ``g = grad_out * (out > 0)``.

    Args:
        grad_out, out, y (Tensor[N, K, P, Q]): NCHW- or NHWC-dense (any mix); ``out`` only
            with ``relu``; ``y``/``mean`` (Tensor[K] fp32) optional (then only sum(g)).
        g_out (Tensor[N, K, P, Q] or None): if given, g itself is written there in the same
            pass (it must have grad_out's strides).
    Returns:
        (sum_g: Tensor[K] fp32, sum_gy: Tensor[K] fp32 or None), reduced in a fixed order.
    """
    check_device(grad_out, "grad_output")
    N, K, P, Q = grad_out.shape
    NL, L = N * P * Q, P * Q
    T = triton.cdiv(NL, _BLOCK_R)
    dev = grad_out.device
    has_y = y is not None
    psum = new_empty((max(T, 1), K), torch.float32, dev)
    psumy = new_empty((max(T, 1), K), torch.float32, dev) if has_y else psum
    sum_g = new_empty((K,), torch.float32, dev)
    sum_gy = new_empty((K,), torch.float32, dev) if has_y else None
    if NL == 0:
        sum_g.zero_()
        if sum_gy is not None:
            sum_gy.zero_()
        return sum_g, sum_gy
    o = out if (relu and out is not None) else grad_out
    yy = y if has_y else grad_out
    if g_out is not None and (g_out.shape != grad_out.shape or g_out.stride() != grad_out.stride()):
        raise ValueError("g_out: expected a tensor of grad_out's shape and strides")
    _bn_backward_partials_kernel[(T, triton.cdiv(K, _BLOCK_C))](
        grad_out, o, yy, mean if has_y else psum, psum, psumy, g_out if g_out is not None else grad_out,
        NL, K, L, *nkl_strides(grad_out), *nkl_strides(o), *nkl_strides(yy),
        RELU=relu, HAS_Y=has_y, WRITE_G=g_out is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
    )
    while True:  # tree levels, the last one writing the sums
        T2 = triton.cdiv(T, _BLOCK_T)
        last = T2 == 1
        osum = sum_g if last else new_empty((T2, K), torch.float32, dev)
        osumy = (sum_gy if last else new_empty((T2, K), torch.float32, dev)) if has_y else osum
        block_c = _BLOCK_C_LAST if last else _BLOCK_C
        _sum_merge_kernel[(T2, triton.cdiv(K, block_c))](
            psum, psumy, osum, osumy, T, K, HAS_Y=has_y, BLOCK_T=_BLOCK_T, BLOCK_C=block_c,
        )
        if last:
            return sum_g, sum_gy
        psum, psumy, T = osum, osumy, T2
