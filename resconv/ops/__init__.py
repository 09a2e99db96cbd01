"""The ops layer: backends, their torch.library ops and the ops' autograd.

Import rules (tests/test_layering.py checks them; no cycle anywhere in resconv):
1. registry (this file) -> backends (``triton.py``, ``cuda.py``; never each other) -> their
   adapters (``triton_conv_backward.py``, ``cuda_extension.py``) and ``backend.py`` ->
   ``autograd.py`` (every op's autograd, once) -> ``_shared.py`` (backend-neutral bottom).
2. Nothing here imports ``resconv/__init__.py``, functional, nn or above; downwards only
   ``reference``, ``_conv_args``, ``build`` and (lazily) ``resconv.triton_kernels``.
3. Importing this package registers every op of every backend (schemas, fakes, autograd).

A backend answers ``unavailable_reason(device, dtype)`` (None when it can serve the call)
and implements ``conv2d``, ``conv_bn_train`` and ``add_relu`` on normalised arguments;
``resconv.functional`` is the only place that chooses one.

* ``torch``: :mod:`resconv.reference` (plain PyTorch, any device, float64 included).
* ``triton``: the Triton kernels behind torch.library ops (:mod:`resconv.ops.triton`).
* ``cuda``: the CUDA C++ extension ``resconv._C`` (:mod:`resconv.ops.cuda`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..reference import add_relu as _ref_add_relu
from ..reference import conv2d as _ref_conv2d
from ..reference import conv_bn2d_train as _ref_conv_bn2d_train
from ..reference import folds_scale as _ref_folds_scale
from .._conv_args import ConvGeometry

# The registration step: each backend module defines its ops (schema, fake implementation,
# autograd) when it is imported, here, so that every op exists right after `import resconv`
# (a graph compiled in another process and loaded from Inductor's cache calls them before
# any resconv code has run). Neither imports triton nor loads the CUDA extension.
from . import cuda, triton


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
    """The reference as a backend: :mod:`resconv.reference` (any device and dtype)."""

    name = "torch"
    cause: Optional[BaseException] = None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def folds_scale(self, x, weight, scale, shift) -> bool:
        """Whether :meth:`conv2d` multiplies the filters by ``scale`` (see reference.folds_scale)."""
        return weight.dtype == x.dtype and _ref_folds_scale(x, scale, shift)

    def conv2d(self, x, weight, scale, shift, residual, g: ConvGeometry, relu: bool, allow_tf32: bool):
        with _cudnn_tf32(x.device, allow_tf32):
            return _ref_conv2d(x, weight, scale, shift, residual, g.stride, g.padding, g.dilation, g.groups, relu)

    def conv_bn_train(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                      residual, g: ConvGeometry, relu, allow_tf32, process_group):
        with _cudnn_tf32(x.device, allow_tf32):
            return _ref_conv_bn2d_train(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual,
                g.stride, g.padding, g.dilation, g.groups, relu, process_group,
            )

    def add_relu(self, x, residual, relu: bool):
        return _ref_add_relu(x, residual, relu)


BACKENDS = {"torch": TorchBackend(), "triton": triton.TritonBackend(), "cuda": cuda.CudaBackend()}
AUTO_ORDER = ("cuda", "triton", "torch")
