"""resconv: fused Conv2d + BatchNorm + residual + ReLU kernels (Triton and CUDA C++) for PyTorch.

    out = act(BN(conv2d(x, W) + b) + residual)

Public API: :mod:`resconv.functional` (ops, backend choice), :mod:`resconv.nn` (drop-in
modules), :mod:`resconv.models` (ResNet-18), :func:`convert` / :func:`revert` (rewrite an
existing model's conv/bn/relu patterns into fused modules and back), :mod:`resconv.reference`
(the plain-PyTorch specification), :func:`summary` / :func:`conv_output_size` /
:func:`receptive_field` (what a network's layers do to their input: shapes, parameters, MACs,
receptive fields; :mod:`resconv.model_summary`).

Importing resconv registers every op of every backend (``torch.ops.resconv.*``: a graph
compiled or exported in another process may call them first). That needs torch, and torch
takes seconds to import, which the ``resconv`` command must not spend on ``--help``: so the
API below is loaded on first use, and the ops are registered as soon as torch is imported
in the process (now, if it already is).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from ._version import __version__

# public name -> (module, attribute or None for the module itself)
_API = {
    "functional": ("resconv.functional", None),
    "models": ("resconv.models", None),
    "nn": ("resconv.nn", None),
    "reference": ("resconv.reference", None),
    "convert": ("resconv.convert", "convert"),
    "revert": ("resconv.convert", "revert"),
    "available_backends": ("resconv.functional", "available_backends"),
    "BackendUnavailableError": ("resconv.functional", "BackendUnavailableError"),
    "InvalidArgumentError": ("resconv._conv_args", "InvalidArgumentError"),
    "InvalidArgumentTypeError": ("resconv._conv_args", "InvalidArgumentTypeError"),
    "summary": ("resconv.model_summary", "summary"),
    "conv_output_size": ("resconv.model_summary", "conv_output_size"),
    "receptive_field": ("resconv.model_summary", "receptive_field"),
}

__all__ = list(_API) + ["__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'resconv' has no attribute {name!r}")
    module, attr = _API[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))


def _register_ops() -> None:
    try:
        importlib.import_module("resconv.ops")
    except Exception as e:  # never break `import torch`; the API's first use raises the real error
        warnings.warn(f"resconv: registering the ops failed ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)


class _RegisterAfterTorch(importlib.abc.MetaPathFinder):
    """Registers resconv's ops right after ``import torch`` has finished (a one-shot hook on
    torch's loader; removed from ``sys.meta_path`` as soon as torch is found)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_ops()

        spec.loader.exec_module = exec_module
        return spec


if "torch" in sys.modules:
    _register_ops()
elif not any(isinstance(f, _RegisterAfterTorch) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTorch())
