"""The specification (resconv.reference) against torch.nn, in float64, and its gradients by
finite differences (gradcheck)."""
from __future__ import annotations


import pytest
import torch

from resconv import reference as ref
from conformance_table import CONV_CASES, conv_module, random_bn

D = torch.float64


def _norm_args(p):
    from resconv._conv_args import conv_geometry

    x = torch.randn(p["N"] or 1, p["C"], p["H"], p["W"], dtype=D)
    w = torch.randn(p["K"], p["C"] // p.get("groups", 1), *((p["kernel_size"],) * 2 if isinstance(p["kernel_size"], int) else p["kernel_size"]), dtype=D)
    g = conv_geometry(x, w, p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1), p.get("groups", 1))
    return x, w, g


@pytest.mark.parametrize("name", [n for n, p in CONV_CASES.items() if p.get("padding_mode", "zeros") == "zeros"])
def test_conv_matches_nn(name):
    p = CONV_CASES[name]
    x, w, g = _norm_args(p)
    conv = conv_module(p)
    with torch.no_grad():
        conv.weight.copy_(w)
    bn = random_bn(p["K"]).eval()
    res = torch.randn(g.out_shape, dtype=D)
    scale, shift = ref.bn_fold(conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    out = ref.conv2d(x, w, scale, shift, res, g.stride, g.padding, g.dilation, g.groups, relu=True)
    with torch.no_grad():
        expect = torch.relu(bn(conv(x)) + res)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_train_matches_nn_and_updates_running_stats():
    p = CONV_CASES["3x3"]
    x, w, g = _norm_args(p)
    conv, bn = conv_module(p), random_bn(p["K"]).train()
    with torch.no_grad():
        conv.weight.copy_(w)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    res = torch.randn(g.out_shape, dtype=D)
    for _ in range(3):
        out = ref.conv_bn2d_train(x, w, None, bn.weight, bn.bias, rm, rv, bn.momentum, bn.eps, res,
                                  g.stride, g.padding, g.dilation, g.groups, relu=True)
        expect = torch.relu(bn(conv(x)) + res)
        torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-12, atol=1e-14)


def test_combine_moments_is_chan():
    y = torch.randn(1000, 7, dtype=D) * 3 + 1e4
    parts = torch.tensor_split(y, [100, 101, 450, 999])  # uneven, one of a single row
    count = torch.tensor([float(len(t)) for t in parts], dtype=D)
    mean = torch.stack([t.mean(0) for t in parts])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in parts])
    n, mu, m2_total = ref.combine_moments(count, mean, m2)
    assert n.item() == 1000
    torch.testing.assert_close(mu, y.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(m2_total / n, y.var(0, unbiased=False), rtol=1e-10, atol=0)


def test_gradcheck_conv2d():
    x = torch.randn(2, 4, 5, 6, dtype=D, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=D, requires_grad=True)
    scale = torch.rand(6, dtype=D, requires_grad=True)
    shift = torch.randn(6, dtype=D, requires_grad=True)
    res = torch.randn(2, 6, 3, 5, dtype=D, requires_grad=True)

    def f(x, w, scale, shift, res):
        return ref.conv2d(x, w, scale, shift, res, (2, 1), (1, 1, 0, 1), (1, 2), 2, relu=True)

    assert torch.autograd.gradcheck(f, (x, w, scale, shift, res), fast_mode=True)


def test_gradcheck_conv_bn_train():
    x = torch.randn(2, 3, 5, 4, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(4, dtype=D, requires_grad=True)
    gamma = torch.rand(4, dtype=D, requires_grad=True)
    beta = torch.randn(4, dtype=D, requires_grad=True)
    res = torch.randn(2, 4, 5, 4, dtype=D, requires_grad=True)

    def f(x, w, b, gamma, beta, res):
        return ref.conv_bn2d_train(x, w, b, gamma, beta, None, None, 0.1, 1e-5, res, (1, 1), (1, 1, 1, 1),
                                   (1, 1), 1, relu=False)

    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta, res), fast_mode=True)


def test_add_relu():
    x, r = torch.randn(3, 4, 5, 6, dtype=D), torch.randn(3, 4, 5, 6, dtype=D)
    torch.testing.assert_close(ref.add_relu(x, r), torch.relu(x + r), rtol=0, atol=0)
    torch.testing.assert_close(ref.add_relu(x, r, relu=False), x + r, rtol=0, atol=0)


def test_reference_follows_torchs_memory_format_rule():
    """channels_last output when the input or the weight is channels_last (torch's rule)."""
    x = torch.randn(2, 8, 5, 5, dtype=D).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 3, 3, dtype=D)
    out = ref.conv2d(x, w, padding=(1, 1, 1, 1))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out = ref.conv2d(x.contiguous(), w.contiguous(memory_format=torch.channels_last), padding=(1, 1, 1, 1))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out = ref.conv2d(x.contiguous(), w, padding=(1, 1, 1, 1))
    assert out.is_contiguous()
