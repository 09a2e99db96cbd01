"""The control of ``resconv inspect``: a plain Triton matmul, compiled at the same tile as a
conv kernel, whose main loop is the yardstick for that kernel's.

``C[M, N] = A[M, K] @ B[K, N]`` with A row-major (K contiguous, like an NHWC input row) and B
stored as ``[N, K]`` (K contiguous, like K R S C filters), the form of Triton's matmul
tutorial (03): one K step per iteration, pointers advanced by a constant, masks only on the
K tail, fp32 accumulation, one rounding on store. Imported only where kernels are compiled.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .aot import Config, Launch, TensorSpec

# Problem size the control is compiled for: multiples of every tile, so the only masks left
# are the K-tail ones the tutorial keeps.
SIZE = 4096


@triton.jit
def control_matmul_kernel(
    a_ptr,  # [M, K], strides (K, 1)
    b_ptr,  # [N, K], strides (K, 1)
    c_ptr,  # [M, N], strides (N, 1)
    M, N, K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    tl.store(c_ptr + offs_cm[:, None] * N + offs_cn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def control_launch(cfg: Config, dtype: str = "bfloat16") -> Launch:
    """The control matmul at ``cfg``'s tile (BLOCK_M/N/K, warps, stages) as a :class:`Launch`."""
    meta = cfg.meta
    tile = Config(tuple(sorted((k, meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))), cfg.num_warps,
                  cfg.num_stages)
    a = TensorSpec((SIZE, SIZE), (SIZE, 1), dtype)
    grid = (triton.cdiv(SIZE, meta["BLOCK_M"]) * triton.cdiv(SIZE, meta["BLOCK_N"]), 1, 1)
    return Launch(f"{__name__}:control_matmul_kernel", (a, a, a, SIZE, SIZE, SIZE), {}, [tile], [grid], [{}],
                  label="control matmul")
