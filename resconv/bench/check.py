"""Output checks: every provider's result is compared with a float32 reference before its
timing is reported; a provider that fails is reported as failing and not timed.

The measure is the relative L2 error ``||out - ref|| / ||ref||`` (NaN or Inf always fail),
against the bounds of :func:`resconv.tolerances.l2_bound` (the project's one tolerance
table). The reference is
:mod:`resconv.reference` (or a plain-PyTorch model) evaluated in float32 on upcast copies of
the very inputs the provider saw, with TF32 off.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..tolerances import l2_bound


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when ``out`` has NaN/Inf or shapes differ."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o, r = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    den = float(torch.linalg.vector_norm(r))
    num = float(torch.linalg.vector_norm(o - r))
    return num / den if den > 0 else num


@dataclass
class CheckResult:
    ok: bool
    err: float  # the worst ratio error/tolerance's error (see `worst`)
    worst: str  # which tensor gave it ('out', 'grad:weight', ...)
    tol: float
    detail: dict  # every tensor's error

    def as_dict(self) -> dict:
        return dict(ok=self.ok, err=_finite(self.err), worst=self.worst, tol=self.tol,
                    detail={k: _finite(v) for k, v in self.detail.items()})


def _finite(v: float):
    return v if math.isfinite(v) else None  # JSON has no inf


def compare(out: torch.Tensor, grads: Optional[Sequence[torch.Tensor]], ref_out: torch.Tensor,
            ref_grads: Optional[Sequence[torch.Tensor]], grad_names: Sequence[str], dtype: torch.dtype,
            level: str = "layer", tf32: bool = False) -> CheckResult:
    """Compare a provider's output (and gradients, when given) with the reference.

    Args:
        out, ref_out: forward outputs (any dtype; compared in float64).
        grads, ref_grads: gradients in ``grad_names`` order, or None.
        dtype: the run's dtype; ``tf32``: float32 ran on TF32 tensor cores (picks the bound).
        level: 'layer' (output / gradient bounds) or 'model' (the network bound for everything).
    """
    net = level == "model"
    t_out = l2_bound(dtype, tf32=tf32, grad=net, network=net)
    t_grad = l2_bound(dtype, tf32=tf32, grad=True, network=net)
    detail = {"out": rel_error(out, ref_out)}
    limits = {"out": t_out}
    if grads is not None:
        if ref_grads is None or len(grads) != len(ref_grads):
            raise ValueError("grads: expected as many gradients as the reference has")
        for name, g, rg in zip(grad_names, grads, ref_grads):
            key = f"grad:{name}"
            detail[key] = math.inf if g is None else rel_error(g, rg)
            limits[key] = t_grad
    worst = max(detail, key=lambda k: detail[k] / limits[k])
    ok = all(math.isfinite(v) and v <= limits[k] for k, v in detail.items())
    return CheckResult(ok=ok, err=detail[worst], worst=worst, tol=limits[worst], detail=detail)


def bounds(dtype: torch.dtype, tf32: bool = False) -> dict:
    """The bounds :func:`compare` applies for ``dtype``: {'out', 'grad', 'model'}."""
    return dict(out=l2_bound(dtype, tf32=tf32), grad=l2_bound(dtype, tf32=tf32, grad=True),
                model=l2_bound(dtype, tf32=tf32, grad=True, network=True))


@contextlib.contextmanager
def exact_fp32():
    """float32 convs and matmuls without TF32 (for the reference), restored afterwards."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
