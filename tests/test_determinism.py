"""Bitwise reproducibility: every resconv op, forward and backward, run twice on the same
inputs gives identical bits, with ``torch.use_deterministic_algorithms(True)`` and without it.

resconv's kernels reduce in a fixed order without atomics (BatchNorm partials and their
Chan merge, dBN reductions, split-K wgrad's second pass, the bias gradient), so the flag
changes nothing for them; the torch backend follows PyTorch's rules (deterministic on CPU).
Under the interpreter on CPU this checks the reduction order of the kernels' programs; on a
GPU (marker-free: the same test runs there) it also covers real scheduling.
"""
from __future__ import annotations

import pytest
import torch

import resconv.functional as RF
from conftest import test_device

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=[True, False], ids=["deterministic", "default"])
def deterministic(request):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(old)


def _leaves(dev, *shapes, cl=False):
    out = []
    for s in shapes:
        t = torch.randn(*s, dtype=torch.float64).float().to(dev)
        if cl and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def _run_twice(make, fn):
    """fn(*fresh copies of make()) twice; returns the two lists of result tensors."""
    base = make()
    results = []
    for _ in range(2):
        args = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in base]
        results.append(fn(*args))
    return results


def _assert_bitwise(a, b, names):
    for x, y, n in zip(a, b, names):
        assert x is not None and y is not None, n
        assert torch.equal(x, y), f"{n}: two runs differ (max |diff| {(x.double() - y.double()).abs().max().item():.3e})"


def _grads(out, g, tensors):
    out.backward(g)
    return [t.grad for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_fused_epilogue(backend, deterministic):
    dev = test_device() if backend == "triton" else "cpu"

    def make():
        x, w, scale, shift, res, g = _leaves(dev, (2, 12, 9, 7), (16, 12, 3, 3), (16,), (16,), (2, 16, 9, 7),
                                             (2, 16, 9, 7), cl=True)
        for t in (x, w, scale, shift, res):
            t.requires_grad_()
        return [x, w, scale, shift, res, g]

    def fn(x, w, scale, shift, res, g):
        out = RF.conv2d(x, w, padding=1, scale=scale, shift=shift, residual=res, relu=True, backend=backend)
        return [out.detach()] + _grads(out, g, (x, w, scale, shift, res))

    a, b = _run_twice(make, fn)
    _assert_bitwise(a, b, ["out", "grad x", "grad w", "grad scale", "grad shift", "grad residual"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["bn-relu", "bn-add-relu"])
def test_conv_bn_train_forward_backward_and_running_stats(backend, residual, deterministic):
    dev = test_device() if backend == "triton" else "cpu"

    def make():
        # N*P*Q = 3*8*7 = 168 rows: several row tiles, so the statistics merge several partials.
        x, w, b, gamma, beta, res, g = _leaves(dev, (3, 10, 8, 7), (24, 10, 3, 3), (24,), (24,), (24,),
                                               (3, 24, 8, 7), (3, 24, 8, 7))
        gamma = (gamma.abs() + 0.5).detach()
        for t in (x, w, b, gamma, beta, res):
            t.requires_grad_()
        rm, rv = torch.zeros(24, device=dev), torch.ones(24, device=dev)
        return [x, w, b, gamma, beta, res, g, rm, rv]

    def fn(x, w, b, gamma, beta, res, g, rm, rv):
        outs = []
        for _ in range(2):  # two steps: the running statistics update twice
            for t in (x, w, b, gamma, beta, res):
                t.grad = None
            out = RF.conv_bn2d(x, w, b, rm, rv, gamma, beta, True, 0.1, 1e-5, 1, 1,
                               residual=res if residual else None, relu=True, backend=backend)
            outs = [out.detach()] + _grads(out, g, (x, w, b, gamma, beta) + ((res,) if residual else ()))
        return outs + [rm.clone(), rv.clone()]

    a, b = _run_twice(make, fn)
    names = ["out", "grad x", "grad w", "grad bias", "grad gamma", "grad beta"] + (["grad residual"] if residual else [])
    _assert_bitwise(a, b, names + ["running_mean", "running_var"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_eval(backend, deterministic):
    dev = test_device() if backend == "triton" else "cpu"

    def make():
        x, w, rm, rv, gamma, beta = _leaves(dev, (2, 8, 6, 6), (8, 8, 3, 3), (8,), (8,), (8,), (8,))
        return [x, w, rm, rv.abs() + 0.5, gamma, beta]

    def fn(x, w, rm, rv, gamma, beta):
        return [RF.conv_bn2d(x, w, None, rm, rv, gamma, beta, False, 0.1, 1e-5, 2, 1, relu=True, backend=backend)]

    a, b = _run_twice(make, fn)
    _assert_bitwise(a, b, ["out"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_relu(backend, deterministic):
    dev = test_device() if backend == "triton" else "cpu"

    def make():
        x, r, g = _leaves(dev, (2, 8, 5, 5), (2, 8, 5, 5), (2, 8, 5, 5), cl=True)
        return [x.requires_grad_(), r.requires_grad_(), g]

    def fn(x, r, g):
        out = RF.add_relu(x, r, backend=backend)
        return [out.detach()] + _grads(out, g, (x, r))

    a, b = _run_twice(make, fn)
    _assert_bitwise(a, b, ["out", "grad x", "grad residual"])
