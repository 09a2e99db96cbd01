"""What resconv's Conv2d computes, pinned by the textbook worked examples, scipy, a property
test of translation equivariance, and gradient descent recovering a known filter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import resconv.nn as rnn
from resconv.demo import KERNELS, filter_bank, kernel, learn_filter
from resconv.data import photo
from conftest import test_device

scipy_signal = pytest.importorskip("scipy.signal")


def _conv(img, k, backend="torch", padding=0, padding_mode="zeros", device="cpu", dtype=torch.float64):
    """A 2-D image through a resconv.nn.Conv2d holding kernel k (1 -> 1 channel, no bias)."""
    k = torch.as_tensor(k, dtype=dtype)
    conv = rnn.Conv2d(1, 1, tuple(k.shape), padding=padding, padding_mode=padding_mode, bias=False).to(device, dtype)
    conv.backend = backend
    with torch.no_grad():
        conv.weight.copy_(k[None, None])
        return conv(torch.as_tensor(img, dtype=dtype, device=device)[None, None])[0, 0].cpu()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sobel_x_worked_example(backend):
    """Rows 0 0 9 9 9: Sobel-x answers 36 where the window straddles the edge, 0 on the flat side."""
    img = [[0, 0, 9, 9, 9]] * 5
    dtype = torch.float64 if backend == "torch" else torch.float32
    out = _conv(img, KERNELS["sobel-x"], backend, device="cpu" if backend == "torch" else test_device(), dtype=dtype)
    assert out.tolist() == [[36, 36, 0]] * 3
    assert out[0, 0] == 36 and (out[:, 2] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkerboard_with_the_x_kernel(backend):
    board = (np.indices((5, 5)).sum(0) % 2 == 0).astype(float)  # 1 on the (0, 0) colour
    x_kernel = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    dtype = torch.float64 if backend == "torch" else torch.float32
    out = _conv(board, x_kernel, backend, device="cpu" if backend == "torch" else test_device(), dtype=dtype)
    assert out.tolist() == [[5, 0, 5], [0, 5, 0], [5, 0, 5]]


def test_conv2d_is_cross_correlation():
    img = torch.rand(9, 11, dtype=torch.float64)
    k = torch.randn(3, 4, dtype=torch.float64)  # asymmetric: correlation and convolution differ
    out = _conv(img, k).numpy()
    np.testing.assert_allclose(out, scipy_signal.correlate2d(img.numpy(), k.numpy(), mode="valid"), rtol=1e-12,
                               atol=1e-12)
    assert not np.allclose(out, scipy_signal.convolve2d(img.numpy(), k.numpy(), mode="valid"))


def test_filter_bank_applies_every_kernel():
    x = photo("camera", 24, grey=True)[None]
    bank = filter_bank()
    bank.backend = "torch"
    with torch.no_grad():
        out = bank(x)
    for i, name in enumerate(KERNELS):
        torch.testing.assert_close(out[0, i], F.conv2d(x, kernel(name)[None, None], padding=1)[0, 0])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(h=st.integers(5, 12), w=st.integers(5, 12), dy=st.integers(0, 4), dx=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_translation_equivariance(h, w, dy, dx, seed):
    """Shifting the input shifts the output: exactly with circular padding; with zero padding
    wherever neither the shifted window nor the original one touches the border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(h, w, generator=g, dtype=torch.float64)
    k = torch.randn(3, 3, generator=g, dtype=torch.float64)
    shifted = torch.roll(x, (dy, dx), (0, 1))
    circ = _conv(x, k, padding=1, padding_mode="circular")
    torch.testing.assert_close(_conv(shifted, k, padding=1, padding_mode="circular"),
                               torch.roll(circ, (dy, dx), (0, 1)), rtol=1e-13, atol=1e-13)
    zero, zero_shifted = _conv(x, k, padding=1), _conv(shifted, k, padding=1)
    rows, cols = slice(dy + 1, h - 1), slice(dx + 1, w - 1)  # windows inside the image and clear of the wrap
    src_rows, src_cols = slice(1, h - 1 - dy), slice(1, w - 1 - dx)
    torch.testing.assert_close(zero_shifted[rows, cols], zero[src_rows, src_cols], rtol=1e-13, atol=1e-13)


def _subsampled_camera(size=32):
    full = photo("camera", grey=True)
    k = full.shape[-1] // size
    return full[:, ::k, ::k][None]


def test_learn_filter_recovers_sobel_x():
    """The demo's defaults on the torch backend: float64, lr 0.3, 2,000 steps, camera at 32x32."""
    x = _subsampled_camera().double()
    w, losses = learn_filter(x, kernel("sobel-x"), 2000, 0.3, 0, backend="torch")
    assert (w - kernel("sobel-x", torch.float64)).abs().max() < 1e-6
    assert losses[0] > 0.1 and losses[-1] < 1e-12


def test_learn_filter_triton_follows_torch():
    """A few steps through the Triton kernels take the same path as the torch backend's."""
    x = _subsampled_camera(8).to(test_device())
    w_t, l_t = learn_filter(x, kernel("sobel-x"), 5, 0.3, 0, backend="triton")
    w_r, l_r = learn_filter(x.cpu(), kernel("sobel-x"), 5, 0.3, 0, backend="torch")
    assert l_t[-1] < l_t[0]
    torch.testing.assert_close(torch.tensor(l_t), torch.tensor(l_r), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_t.cpu(), w_r, rtol=1e-4, atol=1e-5)
