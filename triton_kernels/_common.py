"""What every kernel module shares: the interpreter switch and tensor-view helpers.

Installed as ``resconv.triton_kernels._common``. Nothing here knows of autograd or backends.
"""
from __future__ import annotations

import functools
import os

import torch

# Triton picks interpreter or compiler when a kernel is decorated (at import), so the mode
# is fixed for the life of the process: read it once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Test aid: RESCONV_POISON=1 fills every buffer a kernel is to write with NaN first, so an
# element the kernel fails to write shows up in any comparison.
POISON = os.environ.get("RESCONV_POISON", "0") == "1"

def device_function(fn):
    """``@triton.jit`` for a helper that kernels call (not launched itself).

    Under the interpreter the helper is the interpreter's own rewritten Python function: a
    call through Triton's wrapper patches ``triton.language`` again on every call (about
    0.2 ms; a CIFAR ResNet-18 forward makes some 78,000 such calls), although the enclosing
    launch has patched it already. Compiled, it is the ordinary JIT function.
    """
    import triton

    jitted = triton.jit(fn)
    rewrite = getattr(jitted, "rewrite", None) if INTERPRET else None
    return rewrite() if rewrite is not None else jitted


def interpreter_config(base: dict, **sizes: int) -> dict:
    """The interpreter's one configuration for a launch: ``base`` (small tiles, so that test
    layers span several), with each tile named in ``sizes`` widened where its problem
    dimension is 256 or more (ResNet-18's layer3 and layer4): to 64 for a reduction step
    (``BLOCK_K``), else to 128. The interpreter's cost is per program and per op, not per
    element, so wider tiles there cut a whole-model run by most of its time; they still
    span 2 to 4 tiles."""
    cfg = dict(base)
    for name, size in sizes.items():
        if size >= 256:
            cfg[name] = 64 if name == "BLOCK_K" else 128
    return cfg


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _triton_at_least(major: int, minor: int) -> bool:
    import triton

    parts = triton.__version__.split(".")
    return (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)) >= (major, minor)


def tma_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` may load through TMA tensor descriptors: compiled (never
    under the interpreter), compute capability 9.0 or newer, and Triton 3.8 or newer (the
    version the TMA paths are compiled and checked with; older ones take the pointer path)."""
    if INTERPRET or device.type != "cuda" or not _triton_at_least(3, 8):
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def descriptor_2d(t2d: torch.Tensor):
    """A TMA descriptor over a 2-D view [rows, cols] (cols contiguous), or None where TMA
    cannot read it (base or row stride not 16-byte aligned). Its block shape is set per
    configuration by :func:`set_blocks`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if t2d.data_ptr() % 16 or (t2d.stride(0) * t2d.element_size()) % 16 or t2d.stride(1) != 1:
        return None
    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), [16, 16])


def set_blocks(**blocks: tuple[str, str]):
    """An autotune pre_hook: each descriptor argument ``name=(rows, cols)``, when it is a
    descriptor, gets the block shape [meta[rows], meta[cols]] of the configuration about to run."""
    def hook(nargs):
        for name, (rows, cols) in blocks.items():
            d = nargs[name]
            if type(d).__name__ == "TensorDescriptor":
                d.block_shape = [nargs[rows], nargs[cols]]
    return hook


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
