"""resconv: fused Conv2d + BatchNorm + residual + ReLU kernels (Triton and CUDA C++) for PyTorch.

    out = act(BN(conv2d(x, W) + b) + residual)

Public API: :mod:`resconv.functional` (ops, backend choice), :mod:`resconv.nn` (drop-in
modules), :mod:`resconv.models` (ResNet-18), :func:`convert` / :func:`revert` (rewrite an
existing model's conv/bn/relu patterns into fused modules and back), :mod:`resconv.reference`
(the plain-PyTorch specification), :func:`summary` / :func:`conv_output_size` /
:func:`receptive_field` (what a network's layers do to their input's shape).
"""
from . import functional, models, nn, reference
from ._version import __version__
from .convert import convert, revert
from .functional import BackendUnavailableError, available_backends
from .summary import conv_output_size, receptive_field, summary

__all__ = [
    "functional",
    "models",
    "nn",
    "reference",
    "convert",
    "revert",
    "available_backends",
    "summary",
    "conv_output_size",
    "receptive_field",
    "BackendUnavailableError",
    "__version__",
]
