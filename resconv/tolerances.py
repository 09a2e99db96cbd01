"""The tolerance policy: how close a backend's result must be to the float64 reference.

Written down once, used by the tests and by ``resconv verify``. A result ``out`` passes
against the float64 reference ``ref`` (computed from the same, already rounded, inputs) when
every element satisfies::

    |out - ref| <= atol * max|ref| + rtol * |ref|

``atol`` is relative to the tensor's largest magnitude, so the rule does not depend on the
scale of the data. NaN or Inf where the reference is finite never passes; shapes must match.

Where the numbers come from: fp32 accumulation leaves the final rounding to the output dtype
as the dominant error: 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16) relative, plus one more
rounding where a training-mode intermediate (the conv output y) is stored in that dtype;
TF32 rounds the operands to 10 mantissa bits (2^-11), an error that grows with the square
root of the reduction length. The bounds below are about 4x those estimates; gradients,
which go through a second reduction (dgrad/wgrad) over low-precision intermediates, get 2x
more.

One more rule, for gradients through a ReLU: where a pre-activation lies within the output
tolerance of zero, a correct low-precision forward and the float64 reference can fall on
opposite sides of the ReLU, and that element's gradient then differs by O(1) for any
implementation (PyTorch's own modules included). Gradient references therefore take the
ReLU mask of the result under test inside that band and their own outside it
(:func:`relu_mask_for_reference`): the gradient is checked for the activation pattern the
forward pass actually produced, which the output check has already bounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float  # relative to max |ref|


# key: dtype name, or "tf32" for float32 computed on TF32 tensor cores
OUTPUT = {
    "float64": Tolerance(1e-10, 1e-12),
    "float32": Tolerance(1e-5, 1e-5),
    "tf32": Tolerance(4e-3, 4e-3),
    "float16": Tolerance(4e-3, 2e-3),
    "bfloat16": Tolerance(3e-2, 1.6e-2),
}
GRAD = {k: Tolerance(2 * t.rtol, 2 * t.atol) for k, t in OUTPUT.items()}


def precision_key(dtype: torch.dtype, tf32: bool = False) -> str:
    """'float32', 'tf32', 'float16', 'bfloat16' or 'float64' (a complex dtype: its real dtype's)."""
    dtype = dtype.to_real()
    if dtype == torch.float32 and tf32:
        return "tf32"
    return str(dtype).replace("torch.", "")


# A whole network (ResNet-18: ~20 layers) compounds its layers' rounding: its logits, loss and
# gradients get this factor on the per-layer tolerance.
NETWORK_FACTOR = 4


def tolerance(dtype: torch.dtype, *, tf32: bool = False, grad: bool = False, network: bool = False) -> Tolerance:
    """The tolerance of one result: a layer's output (``OUTPUT``), its gradients (``grad``:
    ``GRAD``), times :data:`NETWORK_FACTOR` for a whole network's (``network``)."""
    t = (GRAD if grad else OUTPUT)[precision_key(dtype, tf32)]
    return Tolerance(NETWORK_FACTOR * t.rtol, NETWORK_FACTOR * t.atol) if network else t


def l2_bound(dtype: torch.dtype, *, tf32: bool = False, grad: bool = False, network: bool = False) -> float:
    """The same table as a whole-tensor bound on the relative L2 error ``||out - ref|| / ||ref||``
    (the benchmark harness's check of each provider before timing it): the ``atol`` of
    :func:`tolerance`. The L2 error averages over the elements where the element-wise rule
    bounds the largest one, so it is the looser of the two; a wrong index or a missing term
    (errors of order 1) still fails it by orders of magnitude."""
    return tolerance(dtype, tf32=tf32, grad=grad, network=network).atol


@dataclass
class Comparison:
    """Result of :func:`compare`: ``ok`` and the errors that decided it."""

    ok: bool
    max_abs_err: float
    max_rel_err: float  # max |out - ref| / max |ref|
    worst_ratio: float  # max over elements of |out - ref| / bound (<= 1 passes)
    reason: Optional[str] = None

    def __str__(self) -> str:
        s = f"max abs {self.max_abs_err:.3e}, rel {self.max_rel_err:.3e}, bound ratio {self.worst_ratio:.2f}"
        return s if self.ok else f"FAIL ({self.reason}): {s}"


def compare(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> Comparison:
    """Check ``out`` against the float64 reference ``ref`` under ``tol`` (see module docstring);
    complex tensors are compared by the modulus of the error."""
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(False, float("inf"), float("inf"), float("inf"), f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    if ref.numel() == 0:
        return Comparison(True, 0.0, 0.0, 0.0)
    wide = torch.complex128 if (out.is_complex() or ref.is_complex()) else torch.float64
    o = out.detach().to(wide).cpu()
    r = ref.detach().to(wide).cpu()
    finite_ref = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o), finite_ref):
        return Comparison(False, float("nan"), float("nan"), float("inf"), "non-finite values where the reference has none (or vice versa)")
    o, r = o[finite_ref], r[finite_ref]
    if r.numel() == 0:
        return Comparison(True, 0.0, 0.0, 0.0)
    scale = r.abs().max().item()
    err = (o - r).abs()
    bound = tol.atol * scale + tol.rtol * r.abs()
    max_abs = err.max().item()
    ratio = (err / bound.clamp_min(1e-300)).max().item() if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    rel = max_abs / scale if scale > 0 else max_abs
    ok = bool((err <= bound).all()) if scale > 0 else max_abs == 0
    return Comparison(ok, max_abs, rel, ratio, None if ok else "error above tolerance")



def relu_mask_for_reference(pre_ref: torch.Tensor, out: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """The ReLU mask a float64 gradient reference should use (see the module docstring).

    Args:
        pre_ref (Tensor): the reference's pre-activation (float64).
        out (Tensor): the output under test (after its ReLU), same shape.
    Returns:
        bool Tensor: ``pre_ref > 0``, except within the tolerance band around zero, where
        ``out > 0``.
    """
    r = pre_ref.detach()
    band = tol.atol * r.abs().max() + tol.rtol * r.abs()
    ambiguous = r.abs() <= band
    return torch.where(ambiguous, out.detach().to(r.device) > 0, r > 0)


def compare_with_peer(out: torch.Tensor, ref: torch.Tensor, peer: torch.Tensor, tol: Tolerance,
                      factor: float = 2.0) -> Comparison:
    """Check ``out`` against the float64 ``ref`` relative to what a peer makes in the same dtype.

    For computations whose rounding error is amplified by the data (a whole network in
    training mode: BatchNorm over a handful of values per channel divides by a small,
    rounded standard deviation), a fixed tolerance is either loose or fails torch.nn itself.
    The rule FlashAttention's tests use applies instead: ``out``'s largest error to ``ref``
    is at most ``factor`` times the peer's (torch.nn in ``out``'s dtype on the same inputs)
    plus ``tol.atol * max|ref|``.
    """
    if tuple(out.shape) != tuple(ref.shape) or tuple(peer.shape) != tuple(ref.shape):
        return Comparison(False, float("inf"), float("inf"), float("inf"), "shapes differ")
    o, r, q = (t.detach().to(torch.float64).cpu() for t in (out, ref, peer))
    if not torch.equal(torch.isfinite(o), torch.isfinite(r)):
        return Comparison(False, float("nan"), float("nan"), float("inf"), "non-finite values where the reference has none (or vice versa)")
    fin = torch.isfinite(r)
    if not torch.isfinite(q[fin]).all():
        return Comparison(False, float("nan"), float("nan"), float("inf"), "the peer is not finite where the reference is")
    o, r, q = o[fin], r[fin], q[fin]
    if r.numel() == 0:
        return Comparison(True, 0.0, 0.0, 0.0)
    scale = r.abs().max().item()
    err = (o - r).abs().max().item()
    bound = factor * (q - r).abs().max().item() + tol.atol * scale
    ok = err <= bound
    ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
    return Comparison(ok, err, err / scale if scale > 0 else err, ratio,
                      None if ok else f"error above {factor}x the peer's + atol")

