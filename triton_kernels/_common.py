"""What every kernel module shares: the interpreter switch and tensor-view helpers.

Installed as ``resconv.triton_kernels._common``. Nothing here knows of autograd or backends.
"""
from __future__ import annotations

import os

import torch

# Triton picks interpreter or compiler when a kernel is decorated (at import), so the mode
# is fixed for the life of the process: read it once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Test aid: RESCONV_POISON=1 fills every buffer a kernel is to write with NaN first, so an
# element the kernel fails to write shows up in any comparison.
POISON = os.environ.get("RESCONV_POISON", "0") == "1"

def check_device(t: torch.Tensor, name: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if t.device.type == "cuda":
        if INTERPRET:
            raise RuntimeError(f"{name}: a CUDA tensor was passed while TRITON_INTERPRET=1 is set")
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(
        f"{name}: Triton kernels need a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set "
        f"before resconv's kernels are imported), got a tensor on {t.device}"
    )


def nkl_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a 4-D tensor [N, K, P, Q] seen as [N, K, L = P*Q]: (s_n, s_k, s_l).

    Valid when P and Q are mergeable (the tensor is contiguous in NCHW or NHWC); the
    callers make sure of that.
    """
    n, k, p, q = t.shape
    if q > 1 and p > 1:
        assert t.stride(2) == t.stride(3) * q, "P and Q are not mergeable"
    s_l = t.stride(3) if q > 1 else (t.stride(2) if p > 1 else 1)
    return t.stride(0), t.stride(1), s_l


def new_empty(shape, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled under RESCONV_POISON=1)."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON:
        t.fill_(float("nan"))
    return t


def dense_like(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """t itself if it is dense in `memory_format`, else a copy that is."""
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)
