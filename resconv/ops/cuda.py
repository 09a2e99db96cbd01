"""The CUDA C++ backend (``resconv._C``): fake implementations and autograd of its ops, and
the backend class.

The ops are defined in C++ (``csrc/ops.cpp``, namespace ``resconv``, names ``cuda_*``); this
module registers, once the extension is loaded:

* a fake (meta) implementation for each op, so that they trace under torch.compile /
  torch.export and run on the meta device;
* autograd for the three user-facing ops: ``cuda_conv2d_fprop`` (eval path),
  ``cuda_conv2d_bn_train`` (training path) and ``cuda_add_relu``. Their backward uses the
  CUDA dReLU/dBN kernels; the conv dgrad/wgrad are chosen by :func:`conv_backward_impl`
  (``RESCONV_CUDA_CONV_BACKWARD``): ATen's ``convolution_backward`` on a materialised dy
  ("aten", the default for now), or resconv's own CUDA C++ dgrad/wgrad
  (``cuda_conv2d_dgrad`` / ``cuda_conv2d_wgrad``) with dReLU/dBN fused into their operand
  loads ("cuda").

The extension is loaded (or compiled just in time) by :func:`resconv.build.load_extension`
on the first call that needs it on a CUDA tensor; importing this module never builds.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

from .. import build as _build
from .._conv_args import ConvGeometry, memory_format_of
from ._conv_backward import DyPrologue, conv2d_backward
from .triton import bn_input_grad_coefficients, out_shape

Tensor = torch.Tensor
SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)

OPS = (
    "cuda_conv2d_fprop",
    "cuda_conv2d_fprop_stats",
    "cuda_conv2d_bn_train",
    "cuda_bn_finalize",
    "cuda_bn_update_running_stats_",
    "cuda_scale_shift_act",
    "cuda_add_relu",
    "cuda_bn_backward_reduce",
    "cuda_bn_backward_dy",
)
# The conv backward ops (tests/test_cuda_conv_backward.py covers them; OPS is the list
# tests/test_cuda_backend.py runs its per-op checks over).
CONV_BACKWARD_OPS = ("cuda_conv2d_dgrad", "cuda_conv2d_wgrad")

# The conv part of the cuda backend's backward: "aten" (ATen's convolution_backward, cuDNN)
# or "cuda" (resconv's CUDA C++ dgrad/wgrad with the fused dReLU/dBN prologue).
CONV_BACKWARD_ENV = "RESCONV_CUDA_CONV_BACKWARD"
CONV_BACKWARD_IMPLS = ("aten", "cuda")
# "aten" until the CUDA dgrad/wgrad kernels have run on a GPU: they compile for sm_80/sm_90
# but were written without one. Make "cuda" the default once tests/test_cuda_conv_backward.py
# (its GPU tests) and the cuda backend's training tests pass on sm_80 and sm_90 with
# RESCONV_CUDA_CONV_BACKWARD=cuda.
CONV_BACKWARD_DEFAULT = "aten"


def conv_backward_impl() -> str:
    """The conv dgrad/wgrad implementation of the cuda backend's backward: the value of
    ``RESCONV_CUDA_CONV_BACKWARD`` ("aten" or "cuda", case-insensitive), else
    :data:`CONV_BACKWARD_DEFAULT`. Read at every backward, so it can be switched at run time.

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get(CONV_BACKWARD_ENV, "").strip().lower()
    if not value:
        return CONV_BACKWARD_DEFAULT
    if value not in CONV_BACKWARD_IMPLS:
        raise ValueError(f"{CONV_BACKWARD_ENV}: expected one of {CONV_BACKWARD_IMPLS}, got {value!r}")
    return value


def ops():
    """``torch.ops.resconv`` with the CUDA ops loaded and their Python registrations done.

    Loads ``resconv._C`` (compiling it just in time if needed); raises its build or import
    error when it cannot be had.
    """
    _register_once(_build.load_extension())
    return torch.ops.resconv


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty(shape, like: Tensor, fmt=torch.contiguous_format, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


# ------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes, dtypes and memory formats exactly as the C++ launchers
# ------------------------------------------------------------------------------------------
_extension = None  # the loaded resconv._C module (set by _register_once)


def _stats_tile_rows() -> int:
    return _extension.STATS_TILE_ROWS


def _fake_conv2d_fprop(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32,
                       channels_last):
    return _empty(out_shape(x, weight, stride, padding, dilation), x, _fmt(channels_last))


def _fake_conv2d_fprop_stats(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                             allow_tf32, channels_last):
    shape = out_shape(x, weight, stride, padding, dilation)
    N, K, P, Q = shape
    T = -(-(N * P * Q) // _stats_tile_rows())
    f32 = torch.float32
    return (_empty(shape, x, _fmt(channels_last)), _empty((T,), x, dtype=f32), _empty((T, K), x, dtype=f32),
            _empty((T, K), x, dtype=f32))


def _fake_conv2d_bn_train(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                          relu, allow_tf32, channels_last):
    shape = out_shape(x, weight, stride, padding, dilation)
    stats = [_empty((shape[1],), x, dtype=torch.float32) for _ in range(3)]
    return (_empty(shape, x, _fmt(channels_last)), _empty(shape, x, _fmt(channels_last)), *stats)


def _fake_bn_finalize(count, mean, m2, weight, bias, eps):
    return tuple(_empty((mean.shape[1],), mean, dtype=torch.float32) for _ in range(5))


def _fake_bn_update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum):
    return None


def _fake_scale_shift_act(y, a, b, residual, relu):
    return _empty(y.shape, y, memory_format_of(y))


def _fake_add_relu(x, residual, relu):
    return _empty(x.shape, x, memory_format_of(x))


def _fake_bn_backward_reduce(grad_out, out, y, mean, relu):
    k = grad_out.shape[1]
    return _empty((k,), grad_out, dtype=torch.float32), _empty((k,), grad_out, dtype=torch.float32)


def _fake_bn_backward_dy(grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype):
    like = out if out is not None else (y if y is not None else grad_out)
    fmt = memory_format_of(like)
    dy = _empty(grad_out.shape, grad_out, fmt, dtype=dy_dtype)
    gres = _empty(grad_out.shape, grad_out, fmt) if want_grad_residual else grad_out.new_empty((0,))
    return dy, gres


def _fake_conv2d_dgrad(grad, weight, relu_out, y, a, b, c, mean, input_size, stride, padding, dilation, groups,
                       channels_last, allow_tf32):
    return _empty(tuple(input_size), weight, _fmt(channels_last))


def _fake_conv2d_wgrad(grad, x, relu_out, y, a, b, c, mean, weight_size, stride, padding, dilation, groups,
                       need_bias, weight_channels_last, allow_tf32, split_k=0):
    gw = _empty(tuple(weight_size), x, _fmt(weight_channels_last))
    gb = _empty((weight_size[0],) if need_bias else (0,), x)
    return gw, gb


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------
def _fprop_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32, channels_last = inputs
    ctx.geom = (list(stride), list(padding), list(dilation), groups)
    ctx.flags = (relu, allow_tf32, channels_last)
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _fprop_backward(ctx, grad_out):
    """out = act(scale * conv(x, W) + shift + residual): gradients of x, W, scale, shift, residual."""
    x, weight, scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geom
    relu, allow_tf32, channels_last = ctx.flags
    nx, nw, nscale, nshift, nres = ctx.needs_input_grad[:5]
    impl = conv_backward_impl()
    o = torch.ops.resconv
    y = None
    if nscale:  # d(scale) = sum(g * conv(x, W)): recompute the raw conv rather than keep it
        y = o.cuda_conv2d_fprop(x, weight, None, None, None, stride, padding, dilation, groups, False, allow_tf32,
                                channels_last)
    sum_g = sum_gy = None
    if nshift or nscale:
        sum_g, sum_gy = o.cuda_bn_backward_reduce(grad_out, out, y, None, relu)
    prologue = None
    if impl == "cuda":
        # dy = scale * where(out > 0, grad_out, 0) is formed in the dgrad/wgrad operand loads;
        # g is written only where it is an output (the residual's gradient).
        g = None
        if nres and relu:
            ones = torch.ones(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
            g, _ = o.cuda_bn_backward_dy(grad_out, out, None, ones, None, None, None, True, False, x.dtype)
        dy, mask = (g, None) if g is not None else (grad_out, out if relu else None)
        if scale is not None or mask is not None:
            a = scale.float() if scale is not None else torch.ones(grad_out.shape[1], device=grad_out.device)
            prologue = DyPrologue(a, mask)
        g_res = (g if relu else grad_out) if nres else None
    elif relu or scale is not None:
        a = scale.float() if scale is not None else torch.ones(grad_out.shape[1], device=grad_out.device)
        # Without a scale, g (the residual's gradient) and dy coincide: write one tensor.
        dy, g = o.cuda_bn_backward_dy(grad_out, out, None, a, None, None, None, relu, nres and scale is not None,
                                      x.dtype)
        g_res = (g if scale is not None else dy) if nres else None
    else:  # no ReLU, no scale: the gradient passes through unchanged
        dy = grad_out
        g_res = grad_out if nres else None
    gx, gw, _ = conv2d_backward(dy, x, weight, stride, padding, dilation, groups, nx, nw, False, impl=impl,
                                allow_tf32=allow_tf32 if impl == "cuda" else None, prologue=prologue)
    if g_res is not None and g_res.dtype != x.dtype:
        g_res = g_res.to(x.dtype)
    g_scale = sum_gy.to(scale.dtype) if nscale else None
    g_shift = sum_g.to(grad_out.dtype if scale is None else scale.dtype) if nshift else None
    return gx, gw, g_scale, g_shift, g_res, None, None, None, None, None, None, None


def _train_setup(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu, allow_tf32,
     channels_last) = inputs
    out, y, mean, invstd, _ = output
    ctx.geom = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.allow_tf32 = allow_tf32
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, weight, bn_weight, y, mean, invstd, out if relu else None)


def _train_backward(ctx, grad_out, _gy, _gmean, _ginvstd, _gvar):
    """Gradients of x, W, bias, gamma, beta and residual through BN with batch statistics."""
    x, weight, bn_weight, y, mean, invstd, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geom
    nx, nw, nb, ngamma, nbeta, nres = ctx.needs_input_grad[:6]
    impl = conv_backward_impl()
    o = torch.ops.resconv
    count = float(y.numel() // y.shape[1]) if y.numel() else 1.0
    sum_g, sum_gy = o.cuda_bn_backward_reduce(grad_out, out, y, mean, ctx.relu)
    a, b, c = bn_input_grad_coefficients(sum_g, sum_gy, invstd, bn_weight, count)
    if impl == "cuda":
        # dy = a*where(out > 0, grad_out, 0) + b*(y - mean) + c is formed in the dgrad/wgrad
        # operand loads and never written; g only where it is an output (the residual's gradient).
        g = None
        if nres and ctx.relu:
            ones = torch.ones(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
            g, _ = o.cuda_bn_backward_dy(grad_out, out, None, ones, None, None, None, True, False, x.dtype)
        src, mask = (g, None) if g is not None else (grad_out, out if ctx.relu else None)
        gx, gw, gb = conv2d_backward(src, x, weight, stride, padding, dilation, groups, nx, nw, nb, impl="cuda",
                                     allow_tf32=ctx.allow_tf32, prologue=DyPrologue(a, mask, y, b, c, mean))
        g_res = ((g if ctx.relu else grad_out) if nres else None)
        if g_res is not None and g_res.dtype != x.dtype:
            g_res = g_res.to(x.dtype)
    else:
        dy, g_res = o.cuda_bn_backward_dy(grad_out, out, y, a, b, c, mean, ctx.relu, nres, x.dtype)
        gx, gw, gb = conv2d_backward(dy, x, weight, stride, padding, dilation, groups, nx, nw, nb)
    bias_dt, gamma_dt, beta_dt = ctx.dtypes
    g_gamma = (sum_gy * invstd).to(gamma_dt) if ngamma else None
    g_beta = sum_g.to(beta_dt) if nbeta else None
    if gb is not None:
        gb = gb.to(bias_dt)
    return (gx, gw, gb, g_gamma, g_beta, (g_res if nres else None)) + (None,) * 8


def _add_setup(ctx, inputs, output):
    ctx.relu = inputs[2]
    ctx.save_for_backward(output if ctx.relu else None)


def _add_backward(ctx, grad_out):
    (out,) = ctx.saved_tensors
    if not ctx.relu:
        return grad_out, grad_out, None
    a = torch.ones(grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    g, _ = torch.ops.resconv.cuda_bn_backward_dy(grad_out, out, None, a, None, None, None, True, False, out.dtype)
    return g, g, None


_FAKES = {
    "cuda_conv2d_fprop": _fake_conv2d_fprop,
    "cuda_conv2d_fprop_stats": _fake_conv2d_fprop_stats,
    "cuda_conv2d_bn_train": _fake_conv2d_bn_train,
    "cuda_bn_finalize": _fake_bn_finalize,
    "cuda_bn_update_running_stats_": _fake_bn_update_running_stats_,
    "cuda_scale_shift_act": _fake_scale_shift_act,
    "cuda_add_relu": _fake_add_relu,
    "cuda_bn_backward_reduce": _fake_bn_backward_reduce,
    "cuda_bn_backward_dy": _fake_bn_backward_dy,
    "cuda_conv2d_dgrad": _fake_conv2d_dgrad,
    "cuda_conv2d_wgrad": _fake_conv2d_wgrad,
}
_AUTOGRAD = {
    "cuda_conv2d_fprop": (_fprop_backward, _fprop_setup),
    "cuda_conv2d_bn_train": (_train_backward, _train_setup),
    "cuda_add_relu": (_add_backward, _add_setup),
}
# The C++ library names this module as the home of its fake implementations
# (set_python_module), and the extension's module init calls _register_once.
_registered = False
_register_lock = threading.Lock()


def _register_once(extension=None) -> None:
    """Register the fake implementations and autograd (once). The extension's module init
    calls this with itself; :func:`ops` calls it too."""
    global _registered, _extension
    with _register_lock:
        if extension is not None:
            _extension = extension
        if _registered:
            return
        for name, fn in _FAKES.items():
            torch.library.register_fake(f"resconv::{name}", fn)
        for name, (backward, setup) in _AUTOGRAD.items():
            torch.library.register_autograd(f"resconv::{name}", backward, setup_context=setup)
        _registered = True


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------
class CudaBackend:
    """Runs resconv's ops with the CUDA C++ kernels (CUDA tensors, fp16/bf16/fp32, sm_80+)."""

    name = "cuda"

    def __init__(self):
        self.cause: Optional[BaseException] = None
        self._load_reason: Optional[str] = None  # None: not tried yet; "": loaded
        self._probed: dict[int, Optional[str]] = {}

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in SERVED_DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        if device.type != "cuda":
            return f"needs a CUDA tensor (the CUDA C++ kernels run on CUDA devices only), got a tensor on {device.type}"
        if self._load_reason is None:
            try:
                ops()  # loads the extension, compiling it just in time on first use
                self._load_reason = ""
            except Exception as e:  # remembered: "auto" asks on every call
                self.cause = e
                self._load_reason = f"the CUDA C++ extension resconv._C is not available ({type(e).__name__}: {e})"
        if self._load_reason:
            return self._load_reason
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in self._probed:
                self._probed[index] = self._device_problem(index)
        except Exception as e:  # e.g. a CUDA device object on a machine without a GPU
            return f"cannot query CUDA device {device} ({type(e).__name__}: {e})"
        return self._probed[index]

    @staticmethod
    def _device_problem(index: int) -> Optional[str]:
        major, minor = torch.cuda.get_device_capability(index)
        if (major, minor) < MIN_CAPABILITY:
            return f"needs a GPU of compute capability 8.0 or newer, got {major}.{minor}"
        mod = _build.loaded_extension()
        err = mod.probe_kernel_image(index)
        if err is not None:
            return (
                f"the extension has no kernels for this GPU (sm_{major}{minor}; built for {mod.compiled_arch_list()}): "
                f"{err}; rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (e.g. `resconv build --arch {major}.{minor}`)"
            )
        return None

    def conv2d(self, x, weight, scale, shift, residual, g: ConvGeometry, relu: bool, allow_tf32: bool):
        return torch.ops.resconv.cuda_conv2d_fprop(
            x, weight, scale, shift, residual, list(g.stride), list(g.padding), list(g.dilation), g.groups, relu,
            allow_tf32, memory_format_of(x) == torch.channels_last,
        )

    def conv_bn_train(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                      residual, g: ConvGeometry, relu, allow_tf32, process_group):
        channels_last = memory_format_of(x) == torch.channels_last
        if process_group is not None:
            from . import cuda_kernels
            from .sync_bn import SyncConvBnTrain

            return SyncConvBnTrain.apply(
                x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var, g, eps, momentum,
                relu, allow_tf32, process_group, cuda_kernels, memory_format_of(x),
            )
        out, _, mean, _, var_unbiased = torch.ops.resconv.cuda_conv2d_bn_train(
            x, weight, bias, bn_weight, bn_bias, residual, list(g.stride), list(g.padding), list(g.dilation),
            g.groups, eps, relu, allow_tf32, channels_last,
        )
        if running_mean is not None or running_var is not None:
            torch.ops.resconv.cuda_bn_update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)
        return out

    def add_relu(self, x, residual, relu: bool):
        return torch.ops.resconv.cuda_add_relu(x, residual, relu)
