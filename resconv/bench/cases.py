"""One measured layer case (layer x batch x mode x dtype x memory format), its input tensors
(several sets, rotated between timed calls) and its float32 reference.

Modes:

* ``eval``: inference, BatchNorm with running statistics (folded), under ``torch.inference_mode``.
* ``train-fwd``: training forward (batch statistics, running-statistics update), autograd recording.
* ``train-fwdbwd``: training forward + backward (gradients of input, weight, BN affine, residual).
* ``train-bwd``: the backward alone, replayed on a retained forward graph.

Two functions are measured: ``fused`` = conv + BN (+ add) (+ ReLU), what resconv computes,
and ``conv`` = the bare convolution (cuDNN's conv on a GPU), the yardstick the issues set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import resconv.reference as R
from .check import exact_fp32
from ..models.layers import ConvLayer

MODES = ("eval", "train-fwd", "train-fwdbwd", "train-bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class LayerCase:
    layer: ConvLayer
    batch: int
    mode: str
    dtype: str  # key of DTYPES
    fmt: str  # key of FORMATS

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return FORMATS[self.fmt]

    @property
    def train(self) -> bool:
        return self.mode != "eval"

    @property
    def backward(self) -> bool:
        return self.mode in ("train-fwdbwd", "train-bwd")

    @property
    def label(self) -> str:
        return f"{self.mode} {self.dtype} {self.fmt} N={self.batch} {self.layer.label}"

    def as_dict(self) -> dict:
        return dict(layer=self.layer.as_dict(), batch=self.batch, mode=self.mode, dtype=self.dtype, fmt=self.fmt)


@dataclass
class LayerSet:
    """The tensors of one input set. BatchNorm parameters and statistics are float32 (as
    under autocast); x, w, res and gout are in the case's dtype and memory format."""

    x: torch.Tensor  # [N, C, H, W]
    w: torch.Tensor  # [K, C, R, S]
    gamma: torch.Tensor  # [K]
    beta: torch.Tensor  # [K]
    rmean: torch.Tensor  # [K]
    rvar: torch.Tensor  # [K]
    res: Optional[torch.Tensor]  # [N, K, P, Q] when the layer adds a residual
    gout: Optional[torch.Tensor]  # [N, K, P, Q] incoming gradient (backward modes)


def grad_names(case: LayerCase, function: str) -> list[str]:
    """Names of the tensors differentiated in backward modes, in the order providers return them."""
    names = [] if case.layer.first else ["x"]
    names.append("weight")
    if function == "fused":
        names += ["bn_weight", "bn_bias"] + (["residual"] if case.layer.residual else [])
    return names


def make_set(case: LayerCase, device: torch.device, gen: torch.Generator) -> LayerSet:
    """Fresh random tensors (never zeros): x and residual ~ N(0, 1), filters scaled so the
    conv output is O(1), BatchNorm parameters and statistics as a trained network has them.
    ``gen`` is a generator on ``device`` (drawing on the GPU: up to 64 sets per case)."""
    L, N, dt, fmt = case.layer, case.batch, case.torch_dtype, case.memory_format

    def randn(*shape, scale=1.0, dtype=dt):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype)

    def unif(lo, hi, n):
        return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo

    x = randn(N, L.C, L.H, L.W).contiguous(memory_format=fmt)
    w = randn(L.K, L.C, L.R, L.S, scale=(2.0 / (L.C * L.R * L.S)) ** 0.5).contiguous(memory_format=fmt)
    res = randn(N, L.K, L.P, L.Q).contiguous(memory_format=fmt) if L.residual else None
    gout = randn(N, L.K, L.P, L.Q).contiguous(memory_format=fmt) if case.backward else None
    if case.train:
        if not L.first:
            x.requires_grad_(True)
        if res is not None:
            res.requires_grad_(True)
    return LayerSet(
        x=x, w=w, gamma=unif(0.5, 1.5, L.K), beta=randn(L.K, scale=0.1, dtype=torch.float32),
        rmean=randn(L.K, scale=0.1, dtype=torch.float32), rvar=unif(0.5, 1.5, L.K), res=res, gout=gout,
    )


def set_bytes(case: LayerCase) -> int:
    """Bytes one input set touches in device memory (inputs, output, gradients)."""
    L, N = case.layer, case.batch
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    act_in, act_out, wts = N * L.C * L.H * L.W, N * L.K * L.P * L.Q, L.K * L.C * L.R * L.S
    n = act_in + wts + act_out * (1 + int(L.residual))
    if case.backward:
        n += act_out + act_in + wts + act_out * int(L.residual)  # gout, dx, dw, dres
    return n * e


def reference(case: LayerCase, s: LayerSet, function: str):
    """float32 result of ``function`` ('fused' or 'conv') on the set's inputs:
    (out, grads or None), grads in :func:`grad_names` order (backward modes)."""
    L = case.layer
    pad = (L.padding[0], L.padding[0], L.padding[1], L.padding[1])
    with exact_fp32(), torch.inference_mode(False), torch.enable_grad():
        leaves = {
            "x": s.x.detach().float(), "weight": s.w.detach().float(), "bn_weight": s.gamma.detach().clone(),
            "bn_bias": s.beta.detach().clone(), "residual": None if s.res is None else s.res.detach().float(),
        }
        names = grad_names(case, function)
        if case.backward:
            for n in names:
                leaves[n].requires_grad_(True)
        x, w = leaves["x"], leaves["weight"]
        if function == "conv":
            out = R.conv_acc(x, w, L.stride, pad, (1, 1), 1)
        elif case.train:
            out = R.conv_bn2d_train(
                x, w, None, leaves["bn_weight"], leaves["bn_bias"], None, None, MOMENTUM, EPS, leaves["residual"],
                L.stride, pad, (1, 1), 1, L.relu,
            )
        else:
            scale, shift = R.bn_fold(None, s.gamma, s.beta, s.rmean, s.rvar, EPS)
            out = R.conv2d(x, w, scale, shift, leaves["residual"], L.stride, pad, (1, 1), 1, L.relu)
        grads = None
        if case.backward:
            grads = torch.autograd.grad(out, [leaves[n] for n in names], s.gout.float())
        return out.detach(), None if grads is None else [g.detach() for g in grads]
