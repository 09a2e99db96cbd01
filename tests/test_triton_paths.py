"""The index arithmetic of the Triton kernels' GPU paths, run under the interpreter: the paths
``resconv inspect`` steered them to (issue 14) are the ones the GPU takes, so each is checked
here against float64 torch, on the same code.

* implicit-GEMM main loops: per-tap row masks as bits (and the direct-compare path for more
  than 32 taps), channel blocks that do and do not divide the channels, 64-bit offsets;
* the stem path: the packed input and filters (:mod:`resconv.triton_kernels.stem`) in fprop
  and wgrad, over strides, paddings, filter sizes and input layouts;
* multiply-high division (fast_divmod) and the tap-bit helpers;
* wgrad's split-K sized for the tile that runs;
* the statistics merges as trees of several levels (and bitwise reproducible);
* the elementwise passes' 2-D tiles in both layouts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resconv import tolerances as T
from resconv.triton_kernels._index import axis_bits, divmod_magic, fast_divmod, tap_bits
from conftest import test_device

pytestmark = pytest.mark.skipif(test_device() != "cpu", reason="interpreter index checks (the GPU runs the suite)")

DEV = "cpu"


def _rand(*shape, dtype=torch.float32, cl=False):
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _check(out, ref, dtype, grad=False):
    cmp = T.compare(out, ref, T.tolerance(dtype, grad=grad))
    assert cmp.ok, str(cmp)


def _fprop(x, w, stride, padding, dilation=(1, 1), groups=1, **kw):
    from resconv.triton_kernels import conv2d_fprop

    pt, pb, pl, pr = padding
    ref = F.conv2d(F.pad(x.double(), (pl, pr, pt, pb)), w.double(), None, stride, 0, dilation, groups)
    out = conv2d_fprop(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       out_shape=tuple(ref.shape), **kw)
    return out, ref


def _wgrad(x, w_shape, dy, stride, padding, dilation=(1, 1), groups=1, **kw):
    from resconv.triton_kernels import conv2d_wgrad

    pt, pb, pl, pr = padding
    x64 = x.double().requires_grad_()
    w64 = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    F.conv2d(F.pad(x64, (pl, pr, pt, pb)), w64, None, stride, 0, dilation, groups).backward(dy.double())
    gw, _ = conv2d_wgrad(dy, x, weight_shape=w_shape, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, **kw)
    return gw, w64.grad


# ---- the stem path -----------------------------------------------------------------------
# (C, H, W, K, R, S, stride, padding (t, b, l, r), dilation, layout): S <= 8, 16 (32, 64
# packed channels), even and odd column strides (16- and 8-byte rows), asymmetric padding,
# dilated rows, 1 to 4 channels, NCHW / NHWC / strided inputs.
STEM = [
    (3, 13, 12, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), "nchw"),
    (3, 9, 10, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "nhwc"),
    (1, 11, 9, 8, 5, 5, (3, 2), (2, 1, 0, 2), (1, 1), "strided"),
    (4, 8, 17, 8, 2, 11, (1, 3), (0, 0, 4, 5), (2, 1), "nchw"),
    (2, 7, 7, 16, 3, 1, (2, 1), (1, 1, 0, 0), (1, 1), "nhwc"),
]


def _layout(x, layout):
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("case", STEM, ids=[f"C{c[0]}-{c[4]}x{c[5]}-s{c[6][0]}{c[6][1]}-{c[9]}" for c in STEM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stem_path_fprop_and_wgrad(case, dtype):
    from resconv.triton_kernels import stem

    C, H, W, K, R, S, stride, padding, dilation, layout = case
    assert stem.applies(C, S, 1, dilation[1]), "the case must take the stem path"
    x = _layout(_rand(2, C, H, W, dtype=dtype), layout)
    w = _rand(K, C, R, S, dtype=dtype)
    x_before = x.clone()
    out, ref = _fprop(x, w, stride, padding, dilation)
    _check(out, ref, dtype)
    dy = _rand(*ref.shape, dtype=dtype)
    gw, gw_ref = _wgrad(x, tuple(w.shape), dy, stride, padding, dilation)
    _check(gw, gw_ref, dtype, grad=True)
    assert torch.equal(x, x_before), "the input must not be modified"


def test_stem_packing_is_the_padded_nhwc_input():
    """The packed buffer the GPU path reads: zeros in the padding and the padded channels,
    the input elsewhere, an even row width, its view's strides."""
    from resconv.triton_kernels import stem

    x = _rand(2, 3, 6, 5)
    view = stem.pack_input(x, (3, 2, 3, 4), 7)
    Hp, Wp = 6 + 5, stem.packed_width(5, 3, 4)
    assert Wp == 5 + 3 + 4 + 0 or Wp == 5 + 3 + 4 + 1 and Wp % 2 == 0
    assert view.shape == (2, 7 * stem.C_PAD, Hp, Wp - 7 + 1)
    assert view.stride() == (Hp * Wp * 4, 1, Wp * 4, 4)
    xp = torch.as_strided(view, (2, Hp, Wp, 4), (Hp * Wp * 4, Wp * 4, 4, 1))
    expect = F.pad(x.permute(0, 2, 3, 1), (0, 1, 3, Wp - 5 - 3, 3, 2))
    assert torch.equal(xp, expect)


def test_stem_path_keeps_non_finite_values_local():
    """A NaN/Inf pixel reaches only the outputs whose taps read it, as in torch: the packed
    rows' columns past a filter row's taps are never read (masked), not multiplied by 0."""
    for value in (float("nan"), float("inf")):
        x = _rand(1, 3, 8, 9)
        x[0, 1, 0, 3] = value
        w = _rand(8, 3, 3, 3)
        out, ref = _fprop(x, w, (1, 1), (0, 0, 0, 0))
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        assert not torch.isfinite(ref).all() and torch.isfinite(ref).any()


# ---- the direct implicit-GEMM paths -------------------------------------------------------
# (C, K, R, S, stride, padding, dilation, groups): 49 taps (direct compares, over 32 tap bits),
# channels that BLOCK_K (16 under the interpreter) does not divide, several channel blocks.
DIRECT = [
    (16, 16, 7, 7, (1, 1), (3, 3, 3, 3), (1, 1), 1),
    (24, 16, 3, 3, (2, 1), (1, 0, 1, 2), (1, 2), 1),
    (48, 32, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 2),
    (32, 24, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("case", DIRECT, ids=[f"C{c[0]}-{c[2]}x{c[3]}-g{c[7]}" for c in DIRECT])
def test_direct_paths_fprop_dgrad(case, monkeypatch):
    from resconv.triton_kernels import conv2d_dgrad

    C, K, R, S, stride, padding, dilation, groups = case
    x = _rand(2, C, 9, 8, cl=True)
    w = _rand(K, C // groups, R, S)
    out, ref = _fprop(x, w, stride, padding, dilation, groups)
    _check(out, ref, torch.float32)
    dy = _rand(*ref.shape, cl=True)
    pt, pb, pl, pr = padding
    x64 = x.double().requires_grad_()
    F.conv2d(F.pad(x64, (pl, pr, pt, pb)), w.double(), None, stride, 0, dilation, groups).backward(dy.double())
    dx = conv2d_dgrad(dy, w, input_shape=tuple(x.shape), stride=stride, padding=padding, dilation=dilation,
                      groups=groups)
    _check(dx, x64.grad, torch.float32, grad=True)


def test_64bit_offsets_path(monkeypatch):
    """The IDX64 variants (taken when a tensor reaches 2**31 elements) compute the same."""
    import resconv.triton_kernels._index as index
    import resconv.triton_kernels.conv_dgrad as D
    import resconv.triton_kernels.conv_fprop as Fp
    import resconv.triton_kernels.conv_wgrad as Wg

    for mod in (Fp, D, Wg):
        monkeypatch.setattr(mod, "needs_int64", lambda *t: True)
    assert index.needs_int64(torch.empty(0)) is False
    x, w = _rand(2, 16, 7, 6, cl=True), _rand(16, 16, 3, 3)
    out, ref = _fprop(x, w, (1, 1), (1, 1, 1, 1), residual=None)
    _check(out, ref, torch.float32)
    dy = _rand(*ref.shape, cl=True)
    gw, gw_ref = _wgrad(x, tuple(w.shape), dy, (1, 1), (1, 1, 1, 1))
    _check(gw, gw_ref, torch.float32, grad=True)


# ---- the TMA filter path ------------------------------------------------------------------
# (C, K, R, S, stride, padding, groups, stem): the descriptor's rows past a group's filters,
# taps of a stride phase (dgrad), the stem's packed filters.
TMA = [
    (64, 32, 3, 3, (1, 1), (1, 1, 1, 1), 1),
    (32, 64, 3, 3, (2, 2), (1, 1, 1, 1), 2),
    (3, 16, 5, 8, (2, 2), (2, 2, 3, 4), 1),  # 8 taps x 4 channels: a 32-wide packed reduction
]


@pytest.mark.parametrize("case", TMA, ids=["3x3", "3x3s2-groups2", "stem-5x8"])
def test_tma_filter_path(case, monkeypatch):
    """The GPU's TMA path (filters through a tensor descriptor, triton >= 3.8 on sm_90) run
    by the interpreter: the descriptor's coordinates are the same index arithmetic."""
    import resconv.triton_kernels._common as common
    import resconv.triton_kernels.conv_dgrad as D
    import resconv.triton_kernels.conv_fprop as Fp

    made = []

    def spy(w2d):
        d = common.descriptor_2d(w2d)
        made.append(d)
        return d

    for mod in (Fp, D):
        monkeypatch.setattr(mod, "tma_available", lambda device: True)
        monkeypatch.setattr(mod, "descriptor_2d", spy)
    C, K, R, S, stride, padding, groups = case
    x = _rand(2, C, 9, 8, cl=True)
    w = _rand(K, C // groups, R, S)
    out, ref = _fprop(x, w, stride, padding, groups=groups)
    _check(out, ref, torch.float32)
    assert made and made[-1] is not None, "the fprop launch must take the TMA path"
    if C >= 16:
        dy = _rand(*ref.shape, cl=True)
        pt, pb, pl, pr = padding
        x64 = x.double().requires_grad_()
        F.conv2d(F.pad(x64, (pl, pr, pt, pb)), w.double(), None, stride, 0, 1, groups).backward(dy.double())
        n = len(made)
        dx = D.conv2d_dgrad(dy, w, input_shape=tuple(x.shape), stride=stride, padding=padding, dilation=(1, 1),
                            groups=groups)
        assert len(made) == n + 1 and made[-1] is not None, "the dgrad launch must take the TMA path"
        _check(dx, x64.grad, torch.float32, grad=True)


def test_descriptor_2d_arguments():
    """Host side of the TMA path: the descriptor over the channels-last filters as
    [K, R*S*C], None where TMA cannot read them, and the per-configuration block shapes."""
    from resconv.triton_kernels._common import descriptor_2d, set_blocks
    from resconv.triton_kernels.conv_dgrad import _gpu_configs as dgrad_configs
    from resconv.triton_kernels.conv_fprop import _gpu_configs as fprop_configs

    w = _rand(32, 16, 3, 3, cl=True)
    w2d = w.permute(0, 2, 3, 1).reshape(32, 9 * 16)
    assert w2d.data_ptr() == w.data_ptr()  # a view: the filters are not copied
    d = descriptor_2d(w2d)
    assert d.base is w2d and list(d.shape) == [32, 144] and list(d.strides) == [144, 1]
    odd = torch.randn(8, 3 * 3 * 3 + 1)[:, 1:]  # base not 16-byte aligned, rows of 27 elements
    assert descriptor_2d(odd) is None
    for configs, rows, cols in ((fprop_configs(), "BLOCK_N", "BLOCK_K"), (dgrad_configs(), "BLOCK_K", "BLOCK_N")):
        for cfg in configs:
            nargs = dict(cfg.kwargs, w_desc=d)
            cfg.pre_hook(nargs)
            assert d.block_shape == [cfg.kwargs[rows], cfg.kwargs[cols]]
    hook = set_blocks(w_desc=("BLOCK_N", "BLOCK_K"))
    plain = torch.empty(1)
    hook(dict(w_desc=plain, BLOCK_N=64, BLOCK_K=32))  # a pointer argument (no TMA) is left alone


# ---- index helpers ------------------------------------------------------------------------
@triton.jit
def _divmod_kernel(x_ptr, q_ptr, r_ptr, d, mul, shift, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    q, r = fast_divmod(tl.load(x_ptr + offs), d, mul, shift)
    tl.store(q_ptr + offs, q)
    tl.store(r_ptr + offs, r)


@triton.jit
def _tap_bits_kernel(h_ptr, w_ptr, o_ptr, R, S, dh, dw, H, W, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    bits = tap_bits(axis_bits(tl.load(h_ptr + offs), dh, R, H), axis_bits(tl.load(w_ptr + offs), dw, S, W), R, S)
    tl.store(o_ptr + offs, bits)


def test_fast_divmod_matches_integer_division():
    x = torch.cat([torch.arange(0, 300), torch.randint(0, 2**31 - 1, (211,)), torch.tensor([2**31 - 1])])
    x = x.to(torch.int32)
    for d in (1, 2, 3, 7, 14, 28, 56, 112, 127, 1000, 65537, 2**31 - 1):
        mul, shift = divmod_magic(d)
        q, r = torch.empty_like(x), torch.empty_like(x)
        _divmod_kernel[(1,)](x, q, r, d, mul, shift, BLOCK=x.numel())
        assert torch.equal(q, x // d) and torch.equal(r, x % d), d
    with pytest.raises(ValueError, match="d: expected"):
        divmod_magic(0)


def test_tap_bits_match_the_bounds():
    h0 = torch.randint(-6, 12, (64,), dtype=torch.int32)
    w0 = torch.randint(-6, 12, (64,), dtype=torch.int32)
    for R, S, dh, dw, H, W in ((3, 3, 1, 1, 7, 9), (7, 4, 2, 1, 10, 5), (1, 5, 1, -2, 4, 8), (4, 8, -1, 3, 6, 6)):
        out = torch.empty(64, dtype=torch.int32)
        _tap_bits_kernel[(1,)](h0, w0, out, R, S, dh, dw, H, W, BLOCK=64)
        expect = torch.zeros(64, dtype=torch.int64)
        for r in range(R):
            for s in range(S):
                ok = (h0 + r * dh >= 0) & (h0 + r * dh < H) & (w0 + s * dw >= 0) & (w0 + s * dw < W)
                expect |= ok.long() << (r * S + s)
        assert torch.equal(out.long() & (2**32 - 1), expect), (R, S)


# ---- wgrad split-K ------------------------------------------------------------------------
def test_wgrad_split_is_sized_for_the_tile():
    from resconv.triton_kernels.conv_wgrad import MAX_SPLIT, split_for

    base = dict(NPQ=256 * 56 * 56, Cg=64, Kg=64, K=64, R=3, S=3, FLAT_N=False, target=264, split_req=0)
    big = split_for(dict(base, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64))
    small = split_for(dict(base, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64))
    assert 1 <= big <= small <= MAX_SPLIT  # fewer tiles, more splits to fill two waves
    tiles_small = 1 * 1 * 9
    assert small == min(-(-264 // tiles_small), MAX_SPLIT)
    assert split_for(dict(base, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, NPQ=200)) == 1  # too short to split
    assert split_for(dict(base, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, split_req=5)) == 5


@pytest.mark.parametrize("split", [None, 3, 64])
def test_wgrad_splits_agree(split):
    x, w_shape = _rand(2, 16, 9, 8, cl=True), (24, 16, 3, 3)
    dy = _rand(2, 24, 9, 8, cl=True)
    runs = [_wgrad(x, w_shape, dy, (1, 1), (1, 1, 1, 1), split_k=split, need_bias=True) for _ in range(2)]
    _check(runs[0][0], runs[0][1], torch.float32, grad=True)
    assert torch.equal(runs[0][0], runs[1][0])


def test_wgrad_split_out_of_range():
    x, dy = _rand(1, 16, 5, 5), _rand(1, 16, 5, 5)
    with pytest.raises(ValueError, match="split_k: expected 1 to 64"):
        _wgrad(x, (16, 16, 3, 3), dy, (1, 1), (1, 1, 1, 1), split_k=65)


# ---- statistics merge trees ----------------------------------------------------------------
def _chan_reference(cnt, mean, m2):
    n = cnt.double().sum()
    mu = (cnt.double()[:, None] * mean.double()).sum(0) / n
    m2_total = m2.double().sum(0) + (cnt.double()[:, None] * (mean.double() - mu) ** 2).sum(0)
    return mu, m2_total / n, m2_total / (n - 1)


@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 70])
def test_bn_finalize_tree(T):
    """T partials through ceil(log_4 T) tree levels (BLOCK_T = 4 under the interpreter): the
    Chan merge of float64, and the same bits twice."""
    from resconv.triton_kernels import bn_finalize
    from resconv.triton_kernels.batchnorm import _BLOCK_T

    assert _BLOCK_T == 4
    K = 37
    cnt = torch.randint(1, 64, (T,)).float()
    mean = (1e3 + torch.randn(T, K)).float()
    m2 = (torch.rand(T, K) * cnt[:, None]).float()
    gamma, beta = torch.rand(K) + 0.5, torch.randn(K)
    runs = [bn_finalize(cnt, mean, m2, gamma, beta, 1e-5) for _ in range(2)]
    mu, var_b, var_u = _chan_reference(cnt, mean, m2)
    got_mean, invstd, got_var_u, a, b = runs[0]
    assert torch.allclose(got_mean.double(), mu, rtol=0, atol=1e-4 * 1e3)
    assert torch.allclose(got_var_u.double(), var_u, rtol=1e-4, atol=1e-6)
    assert torch.allclose(invstd.double(), 1 / (var_b + 1e-5).sqrt(), rtol=1e-4)
    assert torch.allclose(a.double(), gamma.double() * invstd.double(), rtol=1e-6)
    assert torch.allclose(b.double(), beta.double() - got_mean.double() * a.double(), rtol=1e-5, atol=1e-3)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rows", [7, 64 * 4 * 4 + 3])
def test_bn_backward_reduce_tree(rows):
    from resconv.triton_kernels import bn_backward_reduce

    K = 20
    g = _rand(rows, K, 1, 1)
    out = _rand(rows, K, 1, 1)
    y = _rand(rows, K, 1, 1)
    mean = torch.randn(K)
    runs = [bn_backward_reduce(g, out, y, mean, relu=True) for _ in range(2)]
    gm = torch.where(out.double() > 0, g.double(), 0.0)
    assert torch.allclose(runs[0][0].double(), gm.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    assert torch.allclose(runs[0][1].double(), (gm * (y.double() - mean.double()[None, :, None, None])).sum((0, 2, 3)),
                          rtol=1e-5, atol=1e-4)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ---- elementwise 2-D tiles -----------------------------------------------------------------
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_elementwise_tiles(cl):
    from resconv.triton_kernels import bn_backward_dy, scale_shift_act

    N, K, P, Q = 3, 37, 5, 7  # channels and pixels that no tile divides
    y, res, g, o = (_rand(N, K, P, Q, cl=cl) for _ in range(4))
    a, b, c, mean = (torch.randn(K) for _ in range(4))
    col = lambda v: v.double().view(1, -1, 1, 1)  # noqa: E731
    out = scale_shift_act(y, a=a, b=b, center=c, residual=res, relu=True)
    ref = torch.relu((y.double() - col(c)) * col(a) + col(b) + res.double())
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    dy, gres = bn_backward_dy(g, o, y, a=a, b=b, c=c, mean=mean, relu=True, want_grad_residual=True,
                              dy_dtype=torch.float32)
    gm = torch.where(o.double() > 0, g.double(), 0.0)
    assert torch.allclose(gres.double(), gm)
    assert torch.allclose(dy.double(), col(a) * gm + col(b) * (y.double() - col(mean)) + col(c), rtol=1e-6, atol=1e-5)
