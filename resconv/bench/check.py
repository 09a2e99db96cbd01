"""Output checks: every provider's result is compared with a float32 reference before its
timing is reported; a provider that fails is reported as failing and not timed.

The measure is the relative L2 error ``||out - ref|| / ||ref||`` (NaN or Inf always fail),
against the tolerances below, written once per dtype. The reference is
:mod:`resconv.reference` (or a plain-PyTorch model) evaluated in float32 on upcast copies of
the very inputs the provider saw, with TF32 off.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Tolerance:
    out: float  # one layer's forward output
    grad: float  # one layer's gradients (input, weight, BN affine, residual)
    model: float  # whole-network logits, loss and gradients (errors accumulate over ~20 layers)


# Relative L2 error allowed. One rounding of bf16 is 2**-9 relative (fp16: 2**-12); eager
# PyTorch rounds the conv output, the BN output and the sum, so it lands near 3e-3 (bf16) and
# 4e-4 (fp16). float32 on a GPU runs the convs in TF32 (10-bit mantissa, ~3e-4 per conv).
# A wrong index or a missing term gives errors of order 1, far above all of these.
TOLERANCES = {
    torch.bfloat16: Tolerance(out=2e-2, grad=4e-2, model=1e-1),
    torch.float16: Tolerance(out=4e-3, grad=1e-2, model=5e-2),
    torch.float32: Tolerance(out=2e-3, grad=5e-3, model=3e-2),
}


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
            level: str = "layer") -> CheckResult:
    """Compare a provider's output (and gradients, when given) with the reference.

    Args:
        out, ref_out: forward outputs (any dtype; compared in float64).
        grads, ref_grads: gradients in ``grad_names`` order, or None.
        dtype: the run's dtype (picks the tolerance).
        level: 'layer' (out/grad tolerances) or 'model' (model tolerance for everything).
    """
    tol = TOLERANCES[dtype]
    t_out = tol.model if level == "model" else tol.out
    t_grad = tol.model if level == "model" else tol.grad
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
