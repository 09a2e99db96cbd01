"""The CUDA C++ backend: its op schemas and fake implementations, the kernel adapter the
shared autograd is written against, and the backend object.

The kernels are in the extension ``resconv._C`` (``csrc/``), which registers them for these
schemas when it is loaded (:mod:`resconv.ops.cuda_extension`: on the first call that needs it
on a CUDA tensor; importing this module never builds). Everything else is registered here, at
import: the schemas (namespace ``resconv``, names ``cuda_*``), a fake (meta) implementation per
op, so that they trace under torch.compile / torch.export and run on the meta device without
the extension, and autograd for the three user-facing ops (:mod:`resconv.ops.autograd`):
``cuda_conv2d_fprop`` (eval path), ``cuda_conv2d_bn_train`` (training path), ``cuda_add_relu``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._conv_args import conv_out_shape, is_channels_last, memory_format_of
from . import autograd, cuda_extension
from ._shared import DyPrologue, Kernels, empty_like_format
from .backend import KernelBackend

Tensor = torch.Tensor
SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)

# The schemas, as csrc/ops.cpp's kernels implement them (the dispatcher checks each kernel's
# signature against its schema when the extension loads).
SCHEMAS = {
    "cuda_conv2d_fprop":
        "(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups, bool relu, bool allow_tf32, bool channels_last) -> Tensor",
    "cuda_conv2d_fprop_stats":
        "(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups, bool relu, bool allow_tf32, bool channels_last) "
        "-> (Tensor out, Tensor count, Tensor mean, Tensor m2)",
    "cuda_conv2d_bn_train":
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, "
        "int[2] stride, int[4] padding, int[2] dilation, int groups, float eps, bool relu, bool allow_tf32, "
        "bool channels_last) -> (Tensor out, Tensor y, Tensor mean, Tensor invstd, Tensor var_unbiased)",
    "cuda_bn_finalize":
        "(Tensor count, Tensor mean, Tensor m2, Tensor? weight, Tensor? bias, float eps) -> "
        "(Tensor mean, Tensor invstd, Tensor var_unbiased, Tensor a, Tensor b)",
    "cuda_bn_update_running_stats_":
        "(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, Tensor var_unbiased, float momentum) -> ()",
    "cuda_scale_shift_act": "(Tensor y, Tensor? a, Tensor? b, Tensor? residual, bool relu) -> Tensor",
    "cuda_add_relu": "(Tensor x, Tensor residual, bool relu) -> Tensor",
    "cuda_bn_backward_reduce":
        "(Tensor grad_out, Tensor? out, Tensor? y, Tensor? mean, bool relu) -> (Tensor sum_g, Tensor sum_gy)",
    "cuda_bn_backward_dy":
        "(Tensor grad_out, Tensor? out, Tensor? y, Tensor a, Tensor? b, Tensor? c, Tensor? mean, bool relu, "
        "bool want_grad_residual, ScalarType dy_dtype) -> (Tensor dy, Tensor grad_residual)",
    "cuda_conv2d_dgrad":
        "(Tensor grad, Tensor weight, Tensor? relu_out, Tensor? y, Tensor? a, Tensor? b, Tensor? c, Tensor? mean, "
        "int[4] input_size, int[2] stride, int[4] padding, int[2] dilation, int groups, bool channels_last, "
        "bool allow_tf32) -> Tensor",
    "cuda_conv2d_wgrad":
        "(Tensor grad, Tensor x, Tensor? relu_out, Tensor? y, Tensor? a, Tensor? b, Tensor? c, Tensor? mean, "
        "int[4] weight_size, int[2] stride, int[4] padding, int[2] dilation, int groups, bool need_bias, "
        "bool weight_channels_last, bool allow_tf32, int split_k=0) -> (Tensor grad_weight, Tensor grad_bias)",
}
OPS = tuple(n for n in SCHEMAS if n not in ("cuda_conv2d_dgrad", "cuda_conv2d_wgrad"))
# The conv backward ops (tests/test_cuda_conv_backward.py covers them; OPS is the list
# tests/test_cuda_backend.py runs its per-op checks over).
CONV_BACKWARD_OPS = ("cuda_conv2d_dgrad", "cuda_conv2d_wgrad")

_LIB = torch.library.Library("resconv", "FRAGMENT")  # kept alive: the definitions live as long as it
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty(shape, like: Tensor, fmt=torch.contiguous_format, dtype=None) -> Tensor:
    return empty_like_format(shape, like, fmt, dtype)


# ------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes, dtypes and memory formats exactly as the C++ launchers
# ------------------------------------------------------------------------------------------
def _fake_conv2d_fprop(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, allow_tf32,
                       channels_last):
    return _empty(conv_out_shape(x.shape, weight.shape, stride, padding, dilation), x, _fmt(channels_last))


def _fake_conv2d_fprop_stats(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu,
                             allow_tf32, channels_last):
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
    N, K, P, Q = shape
    T = -(-(N * P * Q) // cuda_extension.STATS_TILE_ROWS)
    f32 = torch.float32
    return (_empty(shape, x, _fmt(channels_last)), _empty((T,), x, dtype=f32), _empty((T, K), x, dtype=f32),
            _empty((T, K), x, dtype=f32))


def _fake_conv2d_bn_train(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                          relu, allow_tf32, channels_last):
    shape = conv_out_shape(x.shape, weight.shape, stride, padding, dilation)
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
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"resconv::{_name}", _fake, lib=_LIB)


# ------------------------------------------------------------------------------------------
# the kernel adapter
# ------------------------------------------------------------------------------------------
def ops():
    """``torch.ops.resconv`` with the CUDA kernels loaded (compiling the extension just in time
    if needed); raises its build or import error when it cannot be had."""
    cuda_extension.load()
    return torch.ops.resconv


def _ops_for(t: Tensor):
    """The ops namespace, loading the extension first unless ``t`` is a meta/fake tensor
    (their fake implementations need no kernels)."""
    return torch.ops.resconv if t.device.type == "meta" else ops()


class CudaKernels(Kernels):
    """The CUDA C++ kernels (``torch.ops.resconv.cuda_*``) behind
    :class:`~resconv.ops._shared.Kernels`.

    ``fused_conv_backward`` (default: ``RESCONV_CUDA_CONV_BACKWARD`` == "cuda", read once, on
    first use; assign it to switch later):
    resconv's own CUDA dgrad/wgrad with the fused prologue; otherwise ATen's on a dy that
    ``cuda_bn_backward_dy`` materialises.
    """

    name = "cuda"

    def __init__(self, fused_conv_backward: Optional[bool] = None):
        self._fused = fused_conv_backward

    @property
    def fused_conv_backward(self) -> bool:
        if self._fused is None:  # resolved on first use, so that a bad value fails a call, not the import
            self._fused = cuda_extension.conv_backward_impl() == "cuda"
        return self._fused

    @fused_conv_backward.setter
    def fused_conv_backward(self, value: bool) -> None:
        self._fused = bool(value)

    def fprop(self, x, weight, scale, shift, residual, geom, relu, allow_tf32, out_format):
        return _ops_for(x).cuda_conv2d_fprop(x, weight, scale, shift, residual, *geom, relu, allow_tf32,
                                             out_format == torch.channels_last)

    def bn_train(self, x, weight, bias, bn_weight, bn_bias, residual, geom, eps, relu, allow_tf32, out_format):
        return _ops_for(x).cuda_conv2d_bn_train(x, weight, bias, bn_weight, bn_bias, residual, *geom, eps, relu,
                                                allow_tf32, out_format == torch.channels_last)

    def add_relu(self, x, residual, relu):
        return _ops_for(x).cuda_add_relu(x, residual, relu)

    def update_running_stats_(self, running_mean, running_var, mean, var_unbiased, momentum):
        if running_mean is not None or running_var is not None:
            _ops_for(mean).cuda_bn_update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)

    def bn_backward_reduce(self, grad_out, out, y, mean, relu, want_g):
        o = _ops_for(grad_out)
        sum_g, sum_gy = o.cuda_bn_backward_reduce(grad_out, out if relu else None, y, mean, relu)
        g = None
        if want_g:  # the C++ reduction does not write g: a second pass
            g, _ = self.bn_backward_dy(grad_out, out, None, _ones(grad_out), None, None, None, relu, False,
                                       grad_out.dtype)
        return sum_g, sum_gy, g

    def bn_backward_dy(self, grad_out, out, y, a, b, c, mean, relu, want_grad_residual, dy_dtype):
        dy, gres = _ops_for(grad_out).cuda_bn_backward_dy(grad_out, out, y, a, b, c, mean, relu,
                                                          want_grad_residual, dy_dtype)
        return dy, (gres if want_grad_residual else None)

    def own_conv_backward(self, dy, x, weight, geom, need_input, need_weight, need_bias, allow_tf32, prologue):
        o = _ops_for(x)
        p = prologue if prologue is not None else DyPrologue(None)  # type: ignore[arg-type]
        as_dt = lambda t: t if t is None or t.dtype == x.dtype else t.to(x.dtype)  # noqa: E731
        dy, relu_out, y = as_dt(dy), as_dt(p.relu_out), as_dt(p.y)  # the kernels take one operand dtype
        gx = gw = gb = None
        if need_input:
            gx = o.cuda_conv2d_dgrad(dy, weight, relu_out, y, p.a, p.b, p.c, p.mean, list(x.shape), *geom,
                                     is_channels_last(x), allow_tf32)
        if need_weight or need_bias:
            gw, gb = o.cuda_conv2d_wgrad(dy, x, relu_out, y, p.a, p.b, p.c, p.mean, list(weight.shape), *geom,
                                         need_bias, is_channels_last(weight), allow_tf32)
            gw = gw if need_weight else None
            gb = gb if need_bias else None
        return gx, gw, gb

    def fprop_stats(self, x, weight, bias, geom, allow_tf32, out_format):
        res = _ops_for(x).cuda_conv2d_fprop_stats(x, weight, None, bias, None, *geom, False, allow_tf32,
                                                  out_format == torch.channels_last)
        return tuple(res)

    def bn_finalize(self, count, mean, m2, bn_weight, bn_bias, eps):
        return tuple(_ops_for(mean).cuda_bn_finalize(count, mean, m2, bn_weight, bn_bias, eps))

    def scale_shift_act(self, y, a, b, center, residual, relu):
        # The C++ kernel has no centre yet: it is folded into the shift (b - center * a), which
        # loses log2(|mean| / std) bits where the conv output has a large common offset (the
        # Triton kernel subtracts it first).
        if center is not None:
            b = b - center * a
        return _ops_for(y).cuda_scale_shift_act(y, a, b, residual, relu)


def _ones(t: Tensor) -> Tensor:
    return torch.ones(t.shape[1], dtype=torch.float32, device=t.device)


KERNELS = CudaKernels()
autograd.register(KERNELS, fprop="resconv::cuda_conv2d_fprop", bn_train="resconv::cuda_conv2d_bn_train",
                  add_relu="resconv::cuda_add_relu")


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------
class CudaBackend(KernelBackend):
    """Runs resconv's ops with the CUDA C++ kernels (CUDA tensors, fp16/bf16/fp32, sm_80+)."""

    name = "cuda"

    def __init__(self, kernels: Kernels = KERNELS):
        self.kernels = kernels
        self.cause: Optional[BaseException] = None
        self._load_reason: Optional[str] = None  # None: not tried yet; "": loaded
        self._probed: dict[int, Optional[str]] = {}

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in SERVED_DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        if device.type != "cuda":
            return f"needs a CUDA tensor (the CUDA C++ kernels run on CUDA devices only), got a tensor on {device.type}"
        if not torch.cuda.is_available():  # asked first: building the extension takes minutes
            return "no usable CUDA device (torch.cuda.is_available() is False)"
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
        mod = cuda_extension.loaded()
        err = mod.probe_kernel_image(index)
        if err is not None:
            return (
                f"the extension has no kernels for this GPU (sm_{major}{minor}; built for {mod.compiled_arch_list()}): "
                f"{err}; rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (e.g. `resconv build --arch {major}.{minor}`)"
            )
        return None
