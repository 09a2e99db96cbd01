"""What a kernel backend (triton, cuda) does with a call, once its kernels are chosen.

:class:`KernelBackend` turns the normalised calls of :mod:`resconv.functional` into calls of
the backend's registered ops (through its :class:`~resconv.ops._shared.Kernels`), the
synchronized path into :class:`~resconv.ops.autograd.SyncConvBnTrain`. A backend subclass
says only what it can serve (``unavailable_reason``) and which kernels it has.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._conv_args import ConvGeometry, conv_memory_format
from ._shared import Geometry, Kernels
from .autograd import SyncConvBnTrain


class KernelBackend:
    """Base of the triton and cuda backends.

    Attributes:
        name (str): 'triton' or 'cuda'.
        kernels (Kernels): the backend's kernel adapter.
        cause (BaseException or None): why the backend cannot be had at all (import or build
            error), chained to :class:`resconv.functional.BackendUnavailableError`.
    """

    name = "?"
    kernels: Kernels
    cause: Optional[BaseException] = None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        raise NotImplementedError

    def folds_scale(self, x, weight, scale, shift) -> bool:
        """False: the kernels apply ``scale`` in their epilogue, to the fp32 accumulator."""
        return False

    def conv2d(self, x, weight, scale, shift, residual, g: ConvGeometry, relu: bool, allow_tf32: bool):
        return self.kernels.fprop(x, weight, scale, shift, residual, _geom(g), relu, allow_tf32,
                                  conv_memory_format(x, weight))

    def conv_bn_train(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                      residual, g: ConvGeometry, relu, allow_tf32, process_group):
        fmt = conv_memory_format(x, weight)  # torch's rule for input and weight
        if process_group is not None:
            return SyncConvBnTrain.apply(
                x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var, g, eps, momentum,
                relu, allow_tf32, process_group, self.kernels, fmt,
            )
        out, _, mean, _, var_unbiased = self.kernels.bn_train(
            x, weight, bias, bn_weight, bn_bias, residual, _geom(g), eps, relu, allow_tf32, fmt
        )
        if out.numel() > 0:  # an empty batch leaves them untouched, as BatchNorm2d
            self.kernels.update_running_stats_(running_mean, running_var, mean, var_unbiased, momentum)
        return out

    def add_relu(self, x, residual, relu: bool):
        return self.kernels.add_relu(x, residual, relu)


def _geom(g: ConvGeometry) -> Geometry:
    return Geometry.of(g.stride, g.padding, g.dilation, g.groups)
