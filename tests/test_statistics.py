"""Training-mode BatchNorm statistics that must not cancel: a large common offset on the conv
output (1e4 + N(0, 1), float32) and large float16 magnitudes (whose squares overflow fp16).

resconv reduces per-tile (count, mean, M2) from the fp32 accumulator and merges them with
Chan's formula, so the variance keeps its digits. E[y^2] - E[y]^2 in float32 would lose
them all here: with y ~ 1e4, y^2 ~ 1e8 carries an absolute rounding error of about 6 per
element against a variance of 1 (tt-metal#45968 shows the resulting NaNs); in float16,
y^2 ~ 4e6 overflows (max 65504). Bounds (relative to the float64 batch statistics of the
same rounded operands): the stored conv output y is rounded once, to an ulp of 2^-10 at 1e4
in float32, so the variance is good to about 1e-3 relative; 5e-3 leaves margin and is
still 200x below what the naive formula misses by.
"""
from __future__ import annotations

import pytest
import torch

import resconv.functional as RF
from resconv import tolerances as T
from conftest import test_device

BACKENDS = ["torch", "triton"]

CASES = {
    # name: (dtype, conv-output std, offset, variance rel. bound)
    "float32_offset_1e4": (torch.float32, 1.0, 1e4, 5e-3),
    "float16_large": (torch.float16, 200.0, 2e3, 1e-2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_statistics_do_not_cancel(case, fmt, backend):
    dtype, std, offset, var_bound = CASES[case]
    dev = test_device() if backend == "triton" else "cpu"
    N, C, H, W, K = 4, 8, 9, 8, 16  # N*P*Q = 288 rows: several row tiles, several partials to merge
    x = torch.randn(N, C, H, W, dtype=torch.float64).to(dtype)
    w = (torch.randn(K, C, 3, 3, dtype=torch.float64) * std / (C * 9) ** 0.5).to(dtype)
    b = (offset + torch.randn(K, dtype=torch.float64)).to(dtype)
    if fmt == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(K) + 0.5
    beta = torch.randn(K)
    rm, rv = torch.zeros(K, device=dev), torch.ones(K, device=dev)
    out = RF.conv_bn2d(x.to(dev), w.to(dev), b.to(dev), rm, rv, gamma.to(dev), beta.to(dev), True, 1.0, 1e-5,
                       1, 1, relu=False, allow_tf32=False, backend=backend)  # momentum 1: running = batch stats

    y = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
    mean = y.mean(dim=(0, 2, 3))
    var_b = y.var(dim=(0, 2, 3), unbiased=False)
    var_u = y.var(dim=(0, 2, 3), unbiased=True)
    assert var_u.min() > 0.25 * std**2, "the case must have a real spread"
    assert (y.square() > 65504).any() or dtype == torch.float32, "the case must overflow fp16 squares"

    mean_err = ((rm.double().cpu() - mean).abs() / var_u.sqrt()).max().item()
    var_err = ((rv.double().cpu() - var_u).abs() / var_u).max().item()
    assert mean_err < var_bound, f"running_mean off by {mean_err:.2e} standard deviations"
    assert var_err < var_bound, f"running_var off by {var_err:.2e} (relative)"

    ref = (y - mean.view(1, -1, 1, 1)) / (var_b.view(1, -1, 1, 1) + 1e-5).sqrt()
    ref = ref * gamma.double().view(1, -1, 1, 1) + beta.double().view(1, -1, 1, 1)
    # y is stored in the input dtype and the mean in fp32 before the apply: one rounding of
    # each at the offset's magnitude, over the channel's std, is the output's error floor,
    # on top of the dtype's own tolerance (torch.nn's float32 BatchNorm has the same floor).
    ulp = lambda dt: torch.finfo(dt).eps * offset  # noqa: E731 (within 2x of the ulp at offset)
    floor = (ulp(dtype) + ulp(torch.float32)) / 2 / var_b.sqrt().min().item() * gamma.max().item()
    tol = T.tolerance(dtype)
    atol = tol.atol + floor / ref.abs().max().item()
    if backend == "torch":
        # The torch backend normalises with torch.nn.BatchNorm2d's kernels (its cost, its
        # accuracy): on a CPU their channels_last apply folds the mean into the shift and
        # loses log2(|mean| / std) bits. Held to torch.nn's own error on the same data.
        bn = torch.nn.BatchNorm2d(K, momentum=1.0)
        with torch.no_grad():
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
            nn_out = bn(torch.nn.functional.conv2d(x.float(), w.float(), b.float(), padding=1)).to(dtype)
        atol = max(atol, 1.5 * (nn_out.double() - ref).abs().max().item() / ref.abs().max().item())
    cmp = T.compare(out.cpu(), ref, T.Tolerance(tol.rtol, atol))
    assert cmp.ok, str(cmp)
