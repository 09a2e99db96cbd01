"""The CUDA C++ extension ``resconv._C`` as the cuda backend sees it: loading it (compiling it
just in time if needed, see :mod:`resconv.build`) and the backend's two switches.

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

The switch ``RESCONV_CUDA_HOPPER`` ("0" or "1", default "0") says whether the launchers may run
the Hopper kernels (CUTLASS 3 sm90 implicit GEMM with wgmma and TMA, compiled for sm_90a:
csrc/hopper_*.cu) where their plan (csrc/hopper_plan.h, :func:`hopper_plan`) serves a call;
the hand-written kernels serve the rest. Off by default, so that ``backend="auto"`` never
prefers a path that has not run on a GPU: make it the default once the GPU tests
(``pytest -m "gpu or cuda_ext"`` with RESCONV_CUDA_HOPPER=1 on an H100/H200) pass. It is read
once, when the extension is loaded; :func:`set_hopper` changes it later. With the Hopper
kernels on, the backward materialises dy (one fused elementwise pass) and their dgrad/wgrad
read it.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

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
    return _env_choice(CONV_BACKWARD_ENV, {v: v for v in CONV_BACKWARD_IMPLS}, CONV_BACKWARD_DEFAULT,
                       f"one of {CONV_BACKWARD_IMPLS}")


def _env_choice(name: str, choices: dict, default, expected: str):
    """The value of environment variable ``name`` (case-insensitive, stripped) mapped by
    ``choices``, ``default`` when unset or empty; ValueError naming ``expected`` otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return choices[value]


HOPPER_ENV = "RESCONV_CUDA_HOPPER"
# Off until the Hopper kernels have run on a GPU (they compile for sm_90a and their SASS holds
# wgmma and TMA, checked in CI; their results have not been compared with a reference on one).
HOPPER_DEFAULT = False


def hopper_requested() -> bool:
    """The value of ``RESCONV_CUDA_HOPPER`` ("0"/"1", "off"/"on", "false"/"true"), else
    :data:`HOPPER_DEFAULT`.

    Raises:
        ValueError: any other value.
    """
    return _env_choice(HOPPER_ENV, {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False},
                       HOPPER_DEFAULT, "0 or 1")


def set_hopper(enabled: bool) -> None:
    """Switch the Hopper kernels on or off for this process (loads the extension)."""
    load().set_hopper(bool(enabled))


def hopper_enabled() -> bool:
    """Whether the launchers consider the Hopper kernels: the extension's switch, or (not yet
    loaded) what it will be set to. Never builds the extension."""
    mod = loaded()
    return bool(mod.hopper_switch()) if mod is not None else hopper_requested()


# The fields of csrc/hopper_plan.h's HopperCall, in order (hopper_plan's keyword arguments).
HOPPER_PLAN_FIELDS = (
    "op", "dtype", "tf32", "N", "C", "H", "W", "K", "R", "S", "P", "Q", "groups", "stride_h", "stride_w", "pad_t",
    "pad_b", "pad_l", "pad_r", "dil_h", "dil_w", "out_channels_last", "prologue", "stats_with_epilogue", "cc_major",
    "cc_minor", "sm_count", "compiled", "enabled",
)
HOPPER_OPS = {"fprop": 0, "dgrad": 1, "wgrad": 2}
KERNEL_DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}


def hopper_plan(**call) -> Optional[str]:
    """The Hopper plan's verdict on one conv call, computed by the C++ the launchers run
    (csrc/hopper_plan.h): None when the Hopper kernels serve it, else the reason they do not.
    Keyword arguments: :data:`HOPPER_PLAN_FIELDS` (``op`` a name of :data:`HOPPER_OPS`,
    ``dtype`` one of :data:`KERNEL_DTYPES`, booleans as bools, the rest ints). For tests and
    diagnostics; loads the extension."""
    missing = [f for f in HOPPER_PLAN_FIELDS if f not in call]
    unknown = [f for f in call if f not in HOPPER_PLAN_FIELDS]
    if missing or unknown:
        raise TypeError(f"hopper_plan: missing fields {missing}, unknown fields {unknown}")
    values = dict(call, op=HOPPER_OPS[call["op"]], dtype=KERNEL_DTYPES[call["dtype"]])
    return load().hopper_plan(*(int(values[f]) for f in HOPPER_PLAN_FIELDS))


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
            mod.set_hopper(hopper_requested())  # read once, when the extension is first had
            _checked = True
    return mod


def loaded():
    """The extension if it is already loaded in this process, else None (never builds)."""
    return _build.loaded_extension()
