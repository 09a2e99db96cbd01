"""Property-based conformance (hypothesis): random valid nn.Conv2d / BatchNorm2d
configurations against torch.nn in float64, for every backend that can run here.

Drawn per example: kernel size, stride, padding (int, pair, 'same', 'valid'), padding mode,
dilation, groups (depthwise included), bias, batch (0, 1 and more), odd spatial sizes,
channel counts not multiples of 8, memory format (NCHW, channels_last, a strided view),
dtype, eval or training BatchNorm or none, residual, ReLU. Checked: the output (and in
training the input, weight and gamma gradients and the running statistics) within the
tolerance policy of resconv.tolerances, the output's memory format, and inputs untouched.

Profiles (``RESCONV_HYPOTHESIS_PROFILE``): ``ci`` (default) draws a fixed, derandomized set
of examples that fits the CI budget with the Triton interpreter; ``long`` draws thousands,
randomly, for a run by hand::

    RESCONV_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py

Failures hypothesis found and shrank are pinned below as ``@example``s (regression tests).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Union

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import resconv.functional as RF  # noqa: E402
from resconv import tolerances as T  # noqa: E402
from conftest import test_device  # noqa: E402

settings.register_profile(
    "ci", max_examples=int(os.environ.get("RESCONV_HYPOTHESIS_EXAMPLES", "300")), deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow], print_blob=True,
)
settings.register_profile(
    "long", max_examples=int(os.environ.get("RESCONV_HYPOTHESIS_EXAMPLES", "3000")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow], print_blob=True,
)
PROFILE = os.environ.get("RESCONV_HYPOTHESIS_PROFILE", "ci")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    N: int
    groups: int
    cg: int  # input channels per group
    kg: int  # output channels per group
    H: int
    W: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: Union[str, int, tuple[int, int]]
    padding_mode: str
    bias: bool
    bn: Optional[str]  # None, 'eval', 'train'
    residual: bool
    relu: bool
    dtype: str
    fmt: str  # 'nchw', 'nhwc', 'strided'
    backend: str
    seed: int = 0  # of the random tensors: a failing example replays (and shrinks) exactly

    @property
    def C(self):
        return self.groups * self.cg

    @property
    def K(self):
        return self.groups * self.kg


def _pads(c: Config) -> tuple[int, int]:
    """Total padding per dimension (for the validity checks)."""
    if c.padding == "valid":
        return 0, 0
    if c.padding == "same":
        return tuple(d * (k - 1) for k, d in zip(c.kernel, c.dilation))  # type: ignore[return-value]
    ph, pw = (c.padding, c.padding) if isinstance(c.padding, int) else c.padding
    return 2 * ph, 2 * pw


def _out_size(c: Config) -> tuple[int, int]:
    ph, pw = _pads(c)
    eff = [d * (k - 1) + 1 for k, d in zip(c.kernel, c.dilation)]
    return (c.H + ph - eff[0]) // c.stride[0] + 1, (c.W + pw - eff[1]) // c.stride[1] + 1


@st.composite
def configs(draw) -> Config:
    groups = draw(st.integers(1, 3))
    cg = draw(st.integers(1, 6))
    kg = draw(st.integers(1, 6))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"] if stride == (1, 1) else ["int", "pair", "valid"]))
    padding: Union[str, int, tuple[int, int]]
    padding = {"int": lambda: draw(st.integers(0, 3)), "pair": lambda: (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
               "same": lambda: "same", "valid": lambda: "valid"}[kind]()
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    H = draw(st.integers(max(1, eff[0] - 6), eff[0] + 6))
    W = draw(st.integers(max(1, eff[1] - 6), eff[1] + 6))
    bn = draw(st.sampled_from([None, "eval", "train"]))
    N = draw(st.sampled_from([0, 1, 2, 3]))
    c = Config(N, groups, cg, kg, H, W, kernel, stride, dilation, padding, "zeros", draw(st.booleans()), bn,
               draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(list(DTYPES))),
               draw(st.sampled_from(["nchw", "nhwc", "strided"])), draw(st.sampled_from(["torch", "triton"])))
    c = dataclasses.replace(c, seed=draw(st.integers(0, 2**31 - 1)))
    ph, pw = _pads(c)
    hypothesis.assume(H + ph >= eff[0] and W + pw >= eff[1])  # the kernel fits the padded input
    if padding not in ("valid",) and (ph or pw):
        # reflect needs each side's padding < the size; circular <= the size
        pmax_h, pmax_w = (ph + 1) // 2, (pw + 1) // 2
        modes = ["zeros", "replicate"]
        if pmax_h <= H and pmax_w <= W:
            modes.append("circular")
        if pmax_h < H and pmax_w < W:
            modes.append("reflect")
        c = dataclasses.replace(c, padding_mode=draw(st.sampled_from(modes)))
    P, Q = _out_size(c)
    if bn == "train":
        hypothesis.assume(N * P * Q > 1)  # one value per channel is an error (the catalogue's)
    return c


def _reference_modules(c: Config):
    conv = nn.Conv2d(c.C, c.K, c.kernel, c.stride, c.padding, c.dilation, c.groups, c.bias, c.padding_mode,
                     dtype=torch.float64)
    bn = None
    if c.bn is not None:
        bn = nn.BatchNorm2d(c.K, dtype=torch.float64)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        bn.train(c.bn == "train")
    return conv, bn


def _input(c: Config, dtype, dev):
    shape = (c.N, c.C, c.H, c.W)
    if c.fmt == "strided":
        return torch.randn(*shape[:-1], 2 * c.W, dtype=torch.float64).to(dtype).to(dev)[..., ::2]
    x = torch.randn(shape, dtype=torch.float64).to(dtype).to(dev)
    return x.contiguous(memory_format=torch.channels_last) if c.fmt == "nhwc" else x


def check_config(c: Config) -> None:
    torch.manual_seed(c.seed)
    dtype = DTYPES[c.dtype]
    dev = test_device() if c.backend == "triton" else "cpu"
    conv, bn = _reference_modules(c)
    x = _input(c, dtype, dev)
    w = conv.weight.detach().to(dtype).to(dev)
    b = conv.bias.detach().to(dtype).to(dev) if c.bias else None
    with torch.no_grad():  # the reference sees the same rounded operands
        conv.weight.copy_(w.double().cpu())
        if c.bias:
            conv.bias.copy_(b.double().cpu())
    P, Q = _out_size(c)
    res = torch.randn(c.N, c.K, P, Q, dtype=torch.float64).to(dtype).to(dev) if c.residual else None
    train = c.bn == "train"
    if train:
        x.requires_grad_()
        w.requires_grad_()
    x_before = x.detach().clone()
    args = (c.stride, c.padding, c.dilation, c.groups)
    kw = dict(padding_mode=c.padding_mode, residual=res, relu=c.relu, allow_tf32=False, backend=c.backend)
    if bn is None:
        out = RF.conv2d(x, w, b, *args, **kw)
    else:
        gamma = bn.weight.detach().float().to(dev).requires_grad_(train)
        beta = bn.bias.detach().float().to(dev)
        rm, rv = bn.running_mean.detach().float().to(dev), bn.running_var.detach().float().to(dev)
        rm0 = bn.running_mean.detach().clone()
        out = RF.conv_bn2d(x, w, b, rm, rv, gamma, beta, train, bn.momentum, bn.eps, *args, **kw)

    xr = x.detach().double().cpu().requires_grad_(train)
    y = conv(xr)
    if bn is not None:
        y = bn(y)
    if res is not None:
        y = y + res.double().cpu()
    tol = T.tolerance(dtype)
    ref = torch.relu(y) if c.relu else y
    xhat_err = _stored_y_error(conv, bn, xr.detach(), dtype) if train else None
    out_tol = tol
    if xhat_err is not None and ref.numel() and ref.abs().max() > 0:
        # Training stores the conv output y in the input dtype (as torch.nn's Conv2d output
        # is) before normalising: its rounding, amplified by invstd where the batch's spread
        # is small against |y|, is an error floor torch.nn has too.
        floor = (xhat_err * bn.weight.detach().abs()).max().item()
        out_tol = T.Tolerance(tol.rtol, tol.atol + floor / ref.abs().max().item())
    assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape)
    cmp = T.compare(out, ref, out_tol)
    assert cmp.ok, f"output: {cmp}"
    if x.dim() == 4 and out.numel() and c.fmt != "strided":
        # torch.nn's output (same layouts) has the memory format resconv's must have
        fmt = torch.channels_last if not ref.is_contiguous() else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt), "output must take torch.nn's memory format"
    assert torch.equal(x.detach(), x_before), "input was modified"
    if not train or out.numel() == 0:
        return
    if c.relu:  # the activation pattern our forward produced, where it is ambiguous
        y = y * T.relu_mask_for_reference(y, out, out_tol)
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    mask = (y != 0).double() if c.relu else torch.ones_like(y)
    out.backward(g.to(dev))
    y.backward(g.double())
    gtol = T.tolerance(dtype, grad=True)
    scale_x, scale_w, floor_x, floor_w = _dbn_term_scales(c, conv, bn, xr.detach(), g.double() * mask, xhat_err)
    for name, got, want, scale, floor in (("grad input", x.grad, xr.grad, scale_x, floor_x),
                                          ("grad weight", w.grad, conv.weight.grad, scale_w, floor_w),
                                          ("grad gamma", gamma.grad, bn.weight.grad, None, None)):
        tol = gtol
        if name == "grad gamma" and want.numel() and want.abs().max() > 0:
            # sum(g * x_hat): the stored-y floor above, summed over the channel
            floor = (g.double().abs() * mask).sum(dim=(0, 2, 3)).mul(xhat_err).max().item()
            tol = T.Tolerance(gtol.rtol, gtol.atol + floor / want.abs().max().item())
        if scale is not None and want.numel() and want.abs().max() > 0:
            # dBN subtracts the batch means of gamma*invstd*g and of its product with x_hat
            # from gamma*invstd*g: with few values per channel the result cancels (with 2 it is
            # 0 exactly), for torch.nn too. The error bound of such sums is relative to the
            # sum of the terms' magnitudes, not to the result.
            # plus the stored-y floor, propagated the same way.
            peak = want.abs().max().item()
            tol = T.Tolerance(gtol.rtol, gtol.atol * max(1.0, scale / peak) + floor / peak)
        cmp = T.compare(got, want, tol)
        assert cmp.ok, f"{name}: {cmp}"
    otol = T.tolerance(dtype)
    with torch.no_grad():
        var_u, mean = torch.var_mean(conv(xr.detach()), dim=(0, 2, 3), correction=1)
    # (1 - m) * running + m * batch_mean can cancel to near 0: its error is on the scale of
    # the terms, and the batch mean's on that of the batch's spread.
    m = bn.momentum
    mean_scale = ((1 - m) * rm0.abs() + m * (mean.abs() + var_u.clamp_min(0).sqrt())).max().item()
    peak = bn.running_mean.abs().max().item()
    mean_tol = T.Tolerance(otol.rtol, otol.atol * max(1.0, mean_scale / peak) if peak > 0 else otol.atol)
    for name, got, want, tol in (("running_mean", rm, bn.running_mean, mean_tol),
                                 ("running_var", rv, bn.running_var, otol)):
        cmp = T.compare(got, want, tol)
        assert cmp.ok, f"{name}: {cmp}"


def _stored_y_error(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per channel, the largest error of x_hat = (y - mean) * invstd that one rounding of y
    to ``dtype`` makes: eps(dtype) * max|y| * invstd (Tensor[K], float64)."""
    with torch.no_grad():
        y0 = conv(x)
        if y0.numel() == 0:
            return torch.zeros(y0.shape[1], dtype=torch.float64)
        invstd = (y0.var(dim=(0, 2, 3), unbiased=False) + bn.eps).rsqrt()
        return torch.finfo(dtype).eps * y0.abs().amax(dim=(0, 2, 3)) * invstd


def _dbn_term_scales(c: Config, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, g: torch.Tensor,
                     xhat_err: torch.Tensor) -> tuple[float, float, float, float]:
    """Error scales of the input and weight gradients of training BatchNorm.

    dBN's gradient dy = a * (g - mean(g) - x_hat * mean(g * x_hat)), a = gamma * invstd, has
    terms bounded by T = |a| * (|g| + mean|g| + |x_hat| * mean|g * x_hat|), and x_hat, formed
    from the stored y, carries the error d = xhat_err (:func:`_stored_y_error`), which moves
    dy by up to D = |a| * (d * mean|g * x_hat| + |x_hat| * mean|g| * d + d * mean|g| * d).
    Returns the largest element of T and of D taken through the conv's backward with |W|
    (input gradient) and |x| (weight gradient), same padding mode:
    (T_x, T_w, D_x, D_w). Rounding in the sums is relative to T; D is an absolute floor.
    """
    with torch.no_grad():
        y0 = conv(x)
        var, mean = torch.var_mean(y0, dim=(0, 2, 3), correction=0)
        invstd = (var + bn.eps).rsqrt()
        xhat = ((y0 - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)).abs()
        ga = g.abs()
        a = (bn.weight.double() * invstd).abs().view(1, -1, 1, 1)
        d = xhat_err.view(1, -1, 1, 1)
        m_gx = (ga * xhat).mean(dim=(0, 2, 3), keepdim=True)
        m_g = ga.mean(dim=(0, 2, 3), keepdim=True)
        terms = a * (ga + m_g + xhat * m_gx)
        shift = a * (d * m_gx + xhat * m_g * d + d * m_g * d)
    out = []
    for dy in (terms, shift):
        conv_abs = nn.Conv2d(c.C, c.K, c.kernel, c.stride, c.padding, c.dilation, c.groups, False, c.padding_mode,
                             dtype=torch.float64)
        with torch.no_grad():
            conv_abs.weight.copy_(conv.weight.abs())
        xa = x.abs().requires_grad_()
        (conv_abs(xa) * dy).sum().backward()
        out += [xa.grad.abs().max().item(), conv_abs.weight.grad.abs().max().item()]
    return out[0], out[1], out[2], out[3]


def _pinned(**kw) -> Config:
    base = dict(N=2, groups=1, cg=1, kg=1, H=1, W=1, kernel=(1, 1), stride=(1, 1), dilation=(1, 1), padding=0,
                padding_mode="zeros", bias=False, bn="train", residual=False, relu=False, dtype="float32",
                fmt="nchw", backend="torch", seed=0)
    return Config(**{**base, **kw})


@settings(settings.get_profile(PROFILE))
@given(configs())
# Shrunk failures, pinned. Two values per channel: dBN's input gradient cancels to 0 exactly,
# so it is judged on the scale of its terms (the first run of the ci profile found it).
@example(_pinned())
# fp16 training, two close values per channel: the stored fp16 y's rounding, amplified by
# invstd, in the output and in gamma's gradient (the long profile found both).
@example(_pinned(padding="same", dtype="float16", backend="triton", seed=2138))
@example(_pinned(padding="same", dtype="float16", backend="triton", seed=90))
@example(_pinned(padding="same", bias=True, dtype="bfloat16", backend="triton", seed=2139))  # and in dBN
@example(_pinned(groups=3, kg=4, padding="same", bias=True, relu=True, dtype="bfloat16", fmt="strided",
                 backend="triton", seed=483))  # the same in wgrad, where x_hat's error exceeds 1
# the running mean's update cancelling to near zero (the long profile)
@example(_pinned(H=5, W=11, kernel=(4, 5), stride=(2, 2), dilation=(1, 2), fmt="strided", seed=314011))
def test_random_configurations_match_torch_nn(c):
    hypothesis.event(f"backend={c.backend}")
    hypothesis.event(f"bn={c.bn}")
    hypothesis.event(f"dtype={c.dtype}")
    hypothesis.event(f"groups={'depthwise' if c.cg == 1 and c.groups > 1 else c.groups}")
    check_config(c)
