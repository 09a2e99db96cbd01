"""Backends: what each can serve, and the calls that reach its ops.

A backend answers ``unavailable_reason(device, dtype)`` (None when it can serve the call)
and implements ``conv2d``, ``conv_bn_train`` and ``add_relu`` on normalised arguments.
``resconv.functional`` is the only place that chooses one.

* ``torch``: ``resconv.reference`` (plain PyTorch, any device, float64 included).
* ``triton``: the Triton kernels behind torch.library ops (``resconv.ops.triton``).
* ``cuda``: the CUDA C++ extension ``resconv._C`` (``resconv.ops.cuda``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional

import torch

from .. import reference
from .._conv_args import ConvGeometry, memory_format_of

HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@contextlib.contextmanager
def _cudnn_tf32(device: torch.device, allow_tf32: bool):
    """The torch backend's conv follows cudnn.allow_tf32; force the caller's choice on CUDA."""
    if device.type != "cuda" or torch.backends.cudnn.allow_tf32 == allow_tf32:
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


class TorchBackend:
    name = "torch"
    cause: Optional[BaseException] = None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def conv2d(self, x, weight, scale, shift, residual, g: ConvGeometry, relu: bool, allow_tf32: bool):
        with _cudnn_tf32(x.device, allow_tf32):
            return reference.conv2d(x, weight, scale, shift, residual, g.stride, g.padding, g.dilation, g.groups, relu)

    def conv_bn_train(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                      residual, g: ConvGeometry, relu, allow_tf32, process_group):
        with _cudnn_tf32(x.device, allow_tf32):
            return reference.conv_bn2d_train(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual,
                g.stride, g.padding, g.dilation, g.groups, relu, process_group,
            )

    def add_relu(self, x, residual, relu: bool):
        return reference.add_relu(x, residual, relu)


class TritonBackend:
    name = "triton"

    def __init__(self):
        # Do not import triton here: TRITON_INTERPRET must be set before triton is first
        # imported (its own library functions are decorated then), and a CLI may set it late.
        self.cause: Optional[BaseException] = None
        if importlib.util.find_spec("triton") is None:
            self.cause = ModuleNotFoundError("No module named 'triton'")

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if self.cause is not None:
            return f"triton is not installed ({self.cause})"
        if dtype not in HALF_AND_FLOAT:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        interpret = _interpret_mode()
        if device.type == "cuda":
            if interpret:
                return "TRITON_INTERPRET=1 is set: the Triton kernels run on CPU tensors in this process"
            if not torch.cuda.is_available():
                return "no usable CUDA device (torch.cuda.is_available() is False)"
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"needs a GPU of compute capability 8.0 or newer, got {major}.x"
            return None
        if device.type == "cpu":
            if not interpret:
                return "needs a CUDA tensor (or TRITON_INTERPRET=1 set before the first call, for the CPU interpreter)"
            return _interpreter_problem()
        return f"device type {device.type!r} is not supported"

    def conv2d(self, x, weight, scale, shift, residual, g: ConvGeometry, relu: bool, allow_tf32: bool):
        from . import triton as ops

        return ops.conv2d_fprop(
            x, weight, scale, shift, residual, g.stride, g.padding, g.dilation, g.groups, relu, allow_tf32
        )

    def conv_bn_train(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                      residual, g: ConvGeometry, relu, allow_tf32, process_group):
        from . import triton as ops

        if process_group is not None:
            from .. import triton_kernels
            from .sync_bn import SyncConvBnTrain

            return SyncConvBnTrain.apply(
                x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var, g, eps, momentum,
                relu, allow_tf32, process_group, triton_kernels, memory_format_of(x),
            )
        out, _, mean, _, var_unbiased = ops.conv2d_bn_train(
            x, weight, bias, bn_weight, bn_bias, residual, g.stride, g.padding, g.dilation, g.groups, eps,
            relu, allow_tf32,
        )
        if running_mean is not None and running_var is not None:
            ops.bn_update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)
        elif running_mean is not None or running_var is not None:
            from .. import triton_kernels

            triton_kernels.update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)
        return out

    def add_relu(self, x, residual, relu: bool):
        from . import triton as ops

        return ops.add_relu(x, residual, relu)


def _interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run our kernels here, or None.

    Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8's does not.
    Compiled kernels on a GPU are not affected.
    """
    import numpy
    import triton

    def major_minor(v: str) -> tuple[int, int]:
        parts = v.split(".")
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)

    if major_minor(triton.__version__) < (3, 8) and major_minor(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__}; "
            "use numpy<2.4 (or triton>=3.8) to run the Triton kernels on the CPU"
        )
    return None


def _interpret_mode() -> bool:
    """The interpreter mode the kernels have (or will have, once imported)."""
    import sys

    mod = sys.modules.get("resconv.triton_kernels._common")
    if mod is not None:
        return mod.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_backend():
    from .cuda import CudaBackend

    return CudaBackend()


BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend(), "cuda": _cuda_backend()}

# Register every Triton op now (their modules import no triton): a graph compiled in another
# process and loaded from Inductor's cache calls them before any resconv code has run here.
from . import triton_conv_backward as _triton_conv_backward  # noqa: E402,F401
AUTO_ORDER = ("cuda", "triton", "torch")
