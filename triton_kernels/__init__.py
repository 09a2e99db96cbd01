"""Triton kernels and their thin launchers (installed as ``resconv.triton_kernels``).

Launchers check, allocate and launch; they decide no policy and know nothing of autograd,
modules or backends. Importing this package decorates the kernels, which fixes Triton's
interpreter mode (``TRITON_INTERPRET=1``) for the process.
"""
from ._common import INTERPRET
from .batchnorm import bn_backward_reduce, bn_finalize, update_running_stats_
from .conv_dgrad import conv2d_dgrad
from .conv_fprop import conv2d_fprop
from .conv_wgrad import conv2d_wgrad
from .elementwise import bn_backward_dy, scale_shift_act

__all__ = [
    "INTERPRET",
    "conv2d_fprop",
    "conv2d_dgrad",
    "conv2d_wgrad",
    "scale_shift_act",
    "bn_finalize",
    "update_running_stats_",
    "bn_backward_reduce",
    "bn_backward_dy",
]
