"""Conformance matrix: resconv against torch.nn (float64 on CPU), generated from
tests/conformance_table.py, for every backend that can run here.

Eval mode: conv (+ eval BatchNorm) (+ residual) (+ ReLU) output.
Train mode: output, every gradient (input, weight, bias, gamma, beta, residual) and the
running statistics after two steps.
"""
from __future__ import annotations

import pytest
import torch

import resconv.functional as RF
from resconv import tolerances as T
from conftest import test_device
from conformance_table import (
    conv_module, dtype_of, eval_cases, make_input, random_bn, train_cases,
)

BACKENDS = ["torch", "triton"]


def _device_for(backend: str) -> str:
    return test_device() if backend == "triton" else "cpu"


def _check(name, out, ref, dtype, tf32, grad=False):
    cmp = T.compare(out, ref, T.tolerance(dtype, tf32=tf32 and out.is_cuda, grad=grad))
    assert cmp.ok, f"{name}: {cmp}"


def _reference_eval(case, x, conv, bn, res):
    y = conv(x.detach().double().cpu())
    if case.bn:
        y = bn(y.unsqueeze(0)).squeeze(0) if y.dim() == 3 else bn(y)
    if case.residual:
        y = y + res.detach().double().cpu()
    return torch.relu(y) if case.relu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", eval_cases(), ids=lambda c: c.id)
def test_eval(case, backend):
    dtype, tf32 = dtype_of(case.dtype)
    dev = _device_for(backend)
    p = case.params
    conv = conv_module(p)
    bn = random_bn(p["K"]).eval()
    x = make_input(p, dtype, case.fmt, dev)
    with torch.no_grad():
        ref_shape = conv(x.double().cpu()).shape
    res = torch.randn(ref_shape, dtype=torch.float64).to(dtype).to(dev) if case.residual else None
    w = conv.weight.detach().to(dtype).to(dev)
    b = conv.bias.detach().to(dtype).to(dev) if conv.bias is not None else None
    x_before = x.clone()
    args = (p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1), p.get("groups", 1))
    kw = dict(padding_mode=p.get("padding_mode", "zeros"), residual=res, relu=case.relu, allow_tf32=tf32, backend=backend)
    if case.bn:
        stats = [t.detach().float().to(dev) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
        out = RF.conv_bn2d(x, w, b, *stats, False, 0.1, bn.eps, *args, **kw)
    else:
        out = RF.conv2d(x, w, b, *args, **kw)
    with torch.no_grad():
        # reference from the same rounded operands
        conv.weight.copy_(w.double().cpu())
        if b is not None:
            conv.bias.copy_(b.double().cpu())
        ref = _reference_eval(case, x, conv, bn, res)
    assert out.dtype == dtype and out.device.type == torch.device(dev).type
    if x.dim() == 4 and out.numel():  # torch.nn's output (same layouts) has the memory format ours must have
        fmt = torch.contiguous_format if ref.is_contiguous() else torch.channels_last
        assert out.is_contiguous(memory_format=fmt), "output must take torch.nn's memory format"
    assert torch.equal(x, x_before), "input was modified"
    _check("output", out, ref, dtype, tf32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", train_cases(), ids=lambda c: c.id)
def test_train(case, backend):
    dtype, tf32 = dtype_of(case.dtype)
    dev = _device_for(backend)
    p = case.params
    conv = conv_module(p)
    bn = random_bn(p["K"]).train()
    w = conv.weight.detach().to(dtype).to(dev).requires_grad_()
    b = conv.bias.detach().to(dtype).to(dev).requires_grad_() if conv.bias is not None else None
    gamma = bn.weight.detach().float().to(dev).requires_grad_()
    beta = bn.bias.detach().float().to(dev).requires_grad_()
    rm, rv = bn.running_mean.float().to(dev), bn.running_var.float().to(dev)
    with torch.no_grad():
        conv.weight.copy_(w.double().cpu())
        if b is not None:
            conv.bias.copy_(b.double().cpu())
    args = (p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1), p.get("groups", 1))
    for step in range(2):
        x = make_input(p, dtype, case.fmt, dev).requires_grad_()
        xr = x.detach().double().cpu().requires_grad_()
        yr = bn(conv(xr))
        res = resr = None
        if case.residual:
            res = torch.randn(yr.shape, dtype=torch.float64).to(dtype).to(dev).requires_grad_()
            resr = res.detach().double().cpu().requires_grad_()
            yr = yr + resr
        out = RF.conv_bn2d(
            x, w, b, rm, rv, gamma, beta, True, bn.momentum, bn.eps, *args,
            padding_mode=p.get("padding_mode", "zeros"), residual=res, relu=case.relu, allow_tf32=tf32,
            backend=backend,
        )
        if case.relu:  # the activation pattern our forward produced, where it is ambiguous
            tol = T.tolerance(dtype, tf32=tf32 and out.is_cuda)
            _check(f"output (step {step})", out, torch.relu(yr), dtype, tf32)
            yr = yr * T.relu_mask_for_reference(yr, out, tol)
        else:
            _check(f"output (step {step})", out, yr, dtype, tf32)
        g = torch.randn(yr.shape, dtype=torch.float64).to(dtype)
        out.backward(g.to(dev))
        yr.backward(g.double())
        _check("grad input", x.grad, xr.grad, dtype, tf32, grad=True)
        if res is not None:
            _check("grad residual", res.grad, resr.grad, dtype, tf32, grad=True)
    _check("grad weight", w.grad, conv.weight.grad, dtype, tf32, grad=True)
    _check("grad gamma", gamma.grad, bn.weight.grad, dtype, tf32, grad=True)
    _check("grad beta", beta.grad, bn.bias.grad, dtype, tf32, grad=True)
    if b is not None:  # mathematically zero under BatchNorm: compare on the scale of dW
        scale = conv.weight.grad.abs().max().item()
        assert (b.grad.double().cpu() - conv.bias.grad).abs().max().item() <= 1e-2 * scale
    _check("running_mean", rm, bn.running_mean, dtype, tf32)
    _check("running_var", rv, bn.running_var, dtype, tf32)
