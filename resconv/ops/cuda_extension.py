"""The CUDA C++ extension ``resconv._C`` as the cuda backend sees it: loading it (compiling it
just in time if needed, see :mod:`resconv.build`) and the backend's switch.

The extension registers kernels only (``csrc/ops.cpp``: ``TORCH_LIBRARY_IMPL`` for CUDA and
CPU); the op schemas, their fake implementations and autograd are registered in Python
(:mod:`resconv.ops.cuda`) when resconv is imported, so that the ops exist, trace and run on
the meta device without the extension.

The switch ``RESCONV_CUDA_CONV_BACKWARD`` ("aten" or "cuda") says whether the cuda backend's
backward runs resconv's own CUDA C++ dgrad/wgrad with the dReLU/dBN prologue fused into their
loads ("cuda") or ATen's ``convolution_backward`` (cuDNN) on a materialised dy ("aten", the
default until the CUDA kernels have passed the GPU tests). It is read once, the first time the
backend's kernels need it; ``resconv.ops.BACKENDS["cuda"].kernels.fused_conv_backward = True``
changes it later.
"""
from __future__ import annotations

import os
import threading

import resconv.build as _build

# Rows of output pixels per statistics partial of cuda_conv2d_fprop_stats (kStatsTileRows in
# csrc/kernels.h; checked against the loaded extension).
STATS_TILE_ROWS = 64

CONV_BACKWARD_ENV = "RESCONV_CUDA_CONV_BACKWARD"
CONV_BACKWARD_IMPLS = ("aten", "cuda")
# "aten" until the CUDA dgrad/wgrad kernels have run on a GPU: they compile for sm_80/sm_90
# but were written without one. Make "cuda" the default once tests/test_cuda_conv_backward.py
# (its GPU tests) and the cuda backend's training tests pass on sm_80 and sm_90 with
# RESCONV_CUDA_CONV_BACKWARD=cuda.
CONV_BACKWARD_DEFAULT = "aten"


def conv_backward_impl() -> str:
    """The value of ``RESCONV_CUDA_CONV_BACKWARD`` ("aten" or "cuda", case-insensitive), else
    :data:`CONV_BACKWARD_DEFAULT`.

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get(CONV_BACKWARD_ENV, "").strip().lower()
    if not value:
        return CONV_BACKWARD_DEFAULT
    if value not in CONV_BACKWARD_IMPLS:
        raise ValueError(f"{CONV_BACKWARD_ENV}: expected one of {CONV_BACKWARD_IMPLS}, got {value!r}")
    return value


_lock = threading.Lock()
_checked = False


def load():
    """The loaded extension module (compiled just in time on first use); raises its build or
    import error when it cannot be had (remembered by :func:`resconv.build.load_extension`)."""
    global _checked
    mod = _build.load_extension()
    if not _checked:
        with _lock:
            if mod.STATS_TILE_ROWS != STATS_TILE_ROWS:
                raise RuntimeError(
                    f"resconv._C was built with STATS_TILE_ROWS={mod.STATS_TILE_ROWS}, the Python side expects "
                    f"{STATS_TILE_ROWS}: rebuild the extension (`resconv build --force`)"
                )
            _checked = True
    return mod


def loaded():
    """The extension if it is already loaded in this process, else None (never builds)."""
    return _build.loaded_extension()
