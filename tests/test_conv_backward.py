"""The Triton conv backward: dgrad and wgrad kernels, their dReLU/dBN prologue (dy formed from
the incoming gradient before the kernels run), and the backward of the Triton backend's fused
modules.

References are float64 torch autograd on F.conv2d (and torch.nn modules) computed from the
same, already rounded, inputs. On a machine without a GPU the kernels run under the Triton
interpreter on small shapes chosen for edge cases (partial tiles, several tiles in every
GEMM dimension, stride phases without taps, padding masks); with a GPU the same tests run
the real kernels. Kernel outputs are NaN-poisoned before launch (RESCONV_POISON=1).
"""
from __future__ import annotations

import ctypes.util
import os

# Decide the Triton mode before resconv's kernels are imported (no CUDA query here; the lead's
# tests/conftest.py does the same when present).
if "TRITON_INTERPRET" not in os.environ and ctypes.util.find_library("cuda") is None:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("RESCONV_POISON", "1")

from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import resconv.nn as rnn  # noqa: E402
from resconv import tolerances  # noqa: E402
from resconv.ops._shared import DyPrologue  # noqa: E402
from conftest import conv2d_backward  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# ---- tolerances -------------------------------------------------------------------------
# The project's tolerance policy lives in resconv/tolerances.py (the lead's); until it is in
# this branch, the same rule and numbers are written here once:
#   |out - ref| <= atol * max|ref| + rtol * |ref|   (per element, ref in float64)
try:
    from resconv.tolerances import GRAD as _GRAD  # type: ignore[import-not-found]

    TOL = {k: (v.rtol, v.atol) for k, v in _GRAD.items()}
except ImportError:  # gradient tolerances: 2x the output ones (two roundings before the reduction)
    TOL = {
        "float32": (2e-5, 2e-5),
        "tf32": (8e-3, 8e-3),
        "float16": (8e-3, 4e-3),
        "bfloat16": (6e-2, 3.2e-2),
    }

DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device() -> str:
    """Where the Triton kernels run in this process: 'cuda' with a GPU, else the CPU interpreter."""
    return "cpu" if INTERPRET else "cuda"


def require_gpu():
    if INTERPRET or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none here, or TRITON_INTERPRET=1)")


def assert_close(out: Optional[torch.Tensor], ref: torch.Tensor, prec: str, what: str, scale: float = 1.0):
    assert out is not None, f"{what}: missing"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{what}: non-finite values (unwritten elements are NaN-poisoned)"
    if r.numel() == 0:
        return
    rtol, atol = TOL[prec]
    rtol, atol = rtol * scale, atol * scale
    err = (o - r).abs()
    bound = atol * r.abs().max() + rtol * r.abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), f"{what} ({prec}): max abs err {err.max().item():.3e}, {worst:.2f}x the bound"


def rand(*shape, dtype=torch.float32, fmt="nchw", offset=0.0) -> torch.Tensor:
    """Fresh random values, rounded to dtype, in 'nchw', 'nhwc' or 'strided' (every other column)."""
    if fmt == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64) + offset
        return wide.to(dtype).to(device())[..., ::2]
    t = (torch.randn(*shape, dtype=torch.float64) + offset).to(dtype).to(device())
    return t.contiguous(memory_format=torch.channels_last) if fmt == "nhwc" else t


def out_size(size, pad0, pad1, dil, k, stride):
    return (size + pad0 + pad1 - dil * (k - 1) - 1) // stride + 1


def reference_grads(dy, x, w, stride, padding, dilation, groups):
    """float64 (dx, dW, db) of conv2d(x, w) + b given dy, via torch.autograd on F.conv2d."""
    t, b, l, r = padding
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    out = F.conv2d(F.pad(x64, (l, r, t, b)), w64, None, stride, 0, dilation, groups)
    out.backward(dy.detach().double().cpu())
    return x64.grad, w64.grad, dy.detach().double().cpu().sum((0, 2, 3))


# ---- the conv-case table ------------------------------------------------------------------
# name -> (N, C, H, W, K, (R, S), stride, padding (top, bottom, left, right), dilation, groups).
# Under the interpreter the tiles are 32x32x32: C, K and N*H*W here give partial tiles and,
# in the "multi_tile" case, several tiles along every GEMM dimension of dgrad and wgrad.
CASES = {
    "1x1": (2, 16, 5, 6, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "1x1_stride2": (2, 16, 7, 6, 24, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "3x3_multi_tile": (2, 40, 7, 6, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "3x3_stride2": (2, 16, 9, 8, 24, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "5x5_stride3": (2, 16, 11, 10, 16, (5, 5), (3, 3), (2, 2, 2, 2), (1, 1), 1),
    "7x7_stem_rgb": (2, 3, 12, 11, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),
    "4x4_same_even": (2, 16, 7, 6, 16, (4, 4), (1, 1), (1, 2, 1, 2), (1, 1), 1),
    "2x4_same_even": (2, 16, 6, 7, 16, (2, 4), (1, 1), (0, 1, 1, 2), (1, 1), 1),
    "dil2_stride2": (2, 16, 9, 9, 16, (3, 3), (2, 2), (2, 2, 2, 2), (2, 2), 1),  # odd phases have no taps
    "stride3x2_dil2x3_asym": (2, 16, 10, 11, 16, (3, 2), (3, 2), (2, 0, 1, 3), (2, 3), 1),
    "groups4": (2, 32, 6, 5, 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),
    "depthwise": (2, 16, 7, 7, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 16),
    "depthwise_x2_5x5": (2, 8, 6, 6, 16, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 8),
}
# (case, precision, memory format of x/dy): every case in fp32 (alternating formats), the
# low precisions and TF32 on a few, a non-contiguous input once.
RUNS = [(name, "float32", "nhwc" if i % 2 else "nchw") for i, name in enumerate(CASES)] + [
    ("3x3_multi_tile", "float16", "nhwc"),
    ("3x3_stride2", "bfloat16", "nchw"),
    ("7x7_stem_rgb", "float16", "nhwc"),
    ("depthwise", "bfloat16", "nhwc"),
    ("stride3x2_dil2x3_asym", "float16", "nchw"),
    ("1x1_stride2", "tf32", "nhwc"),
    ("groups4", "float32", "strided"),
]


def make_problem(name, prec, fmt):
    N, C, H, W, K, (R, S), stride, padding, dilation, groups = CASES[name]
    dt = DTYPES[prec]
    P = out_size(H, padding[0], padding[1], dilation[0], R, stride[0])
    Q = out_size(W, padding[2], padding[3], dilation[1], S, stride[1])
    x = rand(N, C, H, W, dtype=dt, fmt=fmt)
    w = rand(K, C // groups, R, S, dtype=dt)
    dy = rand(N, K, P, Q, dtype=dt, fmt="nchw" if fmt == "strided" else fmt)
    return x, w, dy, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("name,prec,fmt", RUNS, ids=[f"{n}-{p}-{f}" for n, p, f in RUNS])
def test_dgrad_wgrad_match_float64(name, prec, fmt):
    x, w, dy, geo = make_problem(name, prec, fmt)
    gx, gw, gb = conv2d_backward(dy, x, w, geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                                 True, True, True, impl="triton", allow_tf32=prec == "tf32")
    rx, rw, rb = reference_grads(dy, x, w, **geo)
    assert_close(gx, rx, prec, "dgrad")
    assert_close(gw, rw, prec, "wgrad")
    assert_close(gb, rb, prec, "bias grad")
    assert gx.dtype == x.dtype and gw.dtype == w.dtype and gb.dtype == w.dtype
    expect_cl = fmt == "nhwc"
    assert gx.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_wgrad_split_k_deterministic(split):
    """Every split count gives the reference, and the same bits on every run (fixed-order
    second pass, no atomics)."""
    from resconv.triton_kernels import conv2d_wgrad

    x, w, dy, geo = make_problem("3x3_stride2", "float32", "nhwc")
    runs = [conv2d_wgrad(dy, x, weight_shape=tuple(w.shape), need_bias=True, split_k=split, **geo) for _ in range(2)]
    _, rw, rb = reference_grads(dy, x, w, **geo)
    assert_close(runs[0][0], rw, "float32", f"wgrad split {split}")
    assert_close(runs[0][1], rb, "float32", f"bias grad split {split}")
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_dgrad_deterministic():
    x, w, dy, geo = make_problem("5x5_stride3", "float16", "nhwc")
    a = conv2d_backward(dy, x, w, **geo, need_input=True, need_weight=False, need_bias=False, impl="triton")[0]
    b = conv2d_backward(dy, x, w, **geo, need_input=True, need_weight=False, need_bias=False, impl="triton")[0]
    assert torch.equal(a, b)


def test_empty_batch():
    x, w, dy, geo = make_problem("3x3_stride2", "float32", "nchw")
    x, dy = x[:0], dy[:0]
    gx, gw, gb = conv2d_backward(dy, x, w, **geo, need_input=True, need_weight=True, need_bias=True, impl="triton")
    assert gx.shape == x.shape and gx.numel() == 0
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(w.shape[0], device=gb.device))


# ---- fused prologue ---------------------------------------------------------------------
def make_prologue(K, g, relu: bool, bn: bool) -> DyPrologue:
    """Random coefficients; relu_out (about half the positions masked) and y in g's layout."""
    vec = lambda lo, hi: torch.empty(K, dtype=torch.float32).uniform_(lo, hi).to(device())  # noqa: E731
    cl = g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
    like_g = lambda t: t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()  # noqa: E731
    relu_out = like_g(torch.relu(rand(*g.shape, dtype=g.dtype))) if relu else None
    if not bn:
        return DyPrologue(vec(0.5, 1.5), relu_out)
    y = like_g(rand(*g.shape, dtype=g.dtype, offset=3.0))
    mean = y.double().mean((0, 2, 3)).float() + 0.1
    return DyPrologue(vec(0.5, 1.5), relu_out, y, vec(-0.5, 0.5), vec(-0.5, 0.5), mean)


def fused_dy_float64(g, p: DyPrologue) -> torch.Tensor:
    col = lambda v: v.double().cpu().view(1, -1, 1, 1)  # noqa: E731
    g = g.double().cpu()
    if p.relu_out is not None:  # torch.relu's gradient: ATen's threshold_backward (NaN out passes g)
        g = torch.ops.aten.threshold_backward(g, p.relu_out.double().cpu(), 0.0)
    dy = g * col(p.a)
    if p.y is not None:
        dy = dy + col(p.b) * (p.y.double().cpu() - col(p.mean)) + col(p.c)
    return dy


PROLOGUE_RUNS = [
    ("3x3_stride2", "float32", "nhwc", True, True),  # padding taps must add nothing (not c[k])
    ("3x3_multi_tile", "float16", "nchw", True, True),
    ("1x1_stride2", "bfloat16", "nhwc", False, True),
    ("7x7_stem_rgb", "float32", "nchw", True, False),  # scale only (eval-mode BN backward)
    ("depthwise", "float16", "nhwc", True, True),
]


@pytest.mark.parametrize("name,prec,fmt,relu,bn", PROLOGUE_RUNS,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}-{'relu' if r[3] else 'norelu'}-{'bn' if r[4] else 'scale'}"
                              for r in PROLOGUE_RUNS])
def test_fused_prologue_matches_unfused(name, prec, fmt, relu, bn):
    """dgrad/wgrad given the prologue (dy formed from g by the dReLU/dBN formula, once, before
    the kernels) == the same kernels on dy materialised in torch, and == float64 autograd on
    the float64 formula."""
    x, w, g, geo = make_problem(name, prec, fmt)
    pro = make_prologue(w.shape[0], g, relu, bn)
    args = (x, w, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], True, True, True)
    fused = conv2d_backward(g, *args, impl="triton", prologue=pro)
    unfused = conv2d_backward(pro.materialize(g, x.dtype), *args, impl="triton")
    for f, u, what in zip(fused, unfused, ("dgrad", "wgrad", "bias grad")):
        # The two differ at most by fp32 operation order in forming dy (one dtype rounding each).
        assert_close(f, u.double(), prec, f"{what} fused vs unfused")
    dy64 = fused_dy_float64(g, pro)
    rx, rw, rb = reference_grads(dy64, x, w, **geo)
    # dy is rounded to the dtype once before the product (as an unfused dy tensor would be).
    for f, r, what in zip(fused, (rx, rw, rb), ("dgrad", "wgrad", "bias grad")):
        assert_close(f, r, prec, f"{what} fused vs float64", scale=2.0)


def test_aten_impl_materialises_prologue():
    """impl='aten' accepts the same prologue (for backends without the fused kernels)."""
    x, w, g, geo = make_problem("3x3_stride2", "float32", "nchw")
    pro = make_prologue(w.shape[0], g, True, True)
    if device() == "cpu":  # ATen's CPU conv backward: compare in float64 exactly as specified
        x, w, g = x.double(), w.double(), g.double()
    args = (x, w, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], True, True, True)
    gx, gw, gb = conv2d_backward(g, *args, impl="aten", prologue=pro)
    rx, rw, rb = reference_grads(fused_dy_float64(g, pro), x, w, **geo)
    for o, r, what in zip((gx, gw, gb), (rx, rw, rb), ("dgrad", "wgrad", "bias grad")):
        assert_close(o, r, "float32", what)


@pytest.mark.parametrize("impl", ["aten", "triton"])
def test_prologue_relu_mask_passes_where_relu_out_is_nan(impl):
    """The prologue's dReLU is threshold_backward's: g is zeroed where relu_out <= 0 and passes
    where relu_out is NaN, as torch.relu's gradient does (``relu_out > 0`` would drop it)."""
    x, w, g, geo = make_problem("3x3_stride2", "float32", "nhwc")
    pro = make_prologue(w.shape[0], g, True, True)
    relu_out = pro.relu_out.clone()
    nan_at = torch.rand(relu_out.shape, device=relu_out.device) < 0.2
    relu_out[nan_at] = float("nan")
    pro = pro._replace(relu_out=relu_out)
    if impl == "aten" and device() == "cpu":
        x, w, g = x.double(), w.double(), g.double()
    args = (x, w, geo["stride"], geo["padding"], geo["dilation"], geo["groups"], True, True, True)
    got = conv2d_backward(g, *args, impl=impl, prologue=pro)
    ref = reference_grads(fused_dy_float64(g, pro), x, w, **geo)
    for o, r, what in zip(got, ref, ("dgrad", "wgrad", "bias grad")):
        assert_close(o, r, "float32", what, scale=2.0)


def test_ops_opcheck():
    """torch.library.opcheck on both custom ops (schema, fake tensors, autograd registration,
    AOT dispatch), through the prologue's optional arguments."""
    from resconv.ops import triton_conv_backward as ops

    x, w, g, geo = make_problem("3x3_stride2", "float32", "nhwc")
    p = make_prologue(w.shape[0], g, True, True)
    geo_l = [list(geo["stride"]), list(geo["padding"]), list(geo["dilation"]), geo["groups"]]
    torch.library.opcheck(ops.conv2d_dgrad, (g, w, p.relu_out, p.y, p.a, p.b, p.c, p.mean, list(x.shape), *geo_l,
                                             True, False))
    torch.library.opcheck(ops.conv2d_wgrad, (g, x, None, None, None, None, None, None, list(w.shape), *geo_l,
                                             True, False, False))


# ---- the fused modules' backward against torch.nn ------------------------------------------
def _nn_reference(m, bias: bool, res: bool, relu: bool = True):
    """float64 torch.nn Conv2d -> BatchNorm2d (train) [-> + residual] [-> ReLU] with m's parameters."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                     bias=bias, dtype=torch.float64)
    bn = nn.BatchNorm2d(m.out_channels, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(m.weight.double().cpu())
        if bias:
            conv.bias.copy_(m.bias.double().cpu())
        bn.weight.copy_(m.bn.weight.double().cpu())
        bn.bias.copy_(m.bn.bias.double().cpu())
    return conv, bn


MODULE_RUNS = [
    # (module, C, K, kernel, stride, padding, bias, precision, format, H, W)
    ("ConvBnReLU2d", 16, 24, 3, 1, 1, False, "float32", "nchw", 7, 6),
    ("ConvBnAddReLU2d", 16, 16, 3, 1, 1, False, "float32", "nhwc", 6, 7),
    ("ConvBnAddReLU2d", 16, 32, 3, 2, 1, False, "float16", "nhwc", 9, 8),
    ("ConvBnReLU2d", 16, 32, 1, 2, 0, True, "bfloat16", "nchw", 8, 9),
    ("ConvBnReLU2d", 3, 16, 7, 2, 3, True, "float32", "nhwc", 12, 11),
]


@pytest.mark.parametrize("run", MODULE_RUNS, ids=[f"{r[0]}-k{r[3]}s{r[4]}{'-bias' if r[6] else ''}-{r[7]}-{r[8]}"
                                                  for r in MODULE_RUNS])
def test_fused_module_grads_match_torch_nn(run):
    """Train-mode resconv.nn modules on the Triton backend: every gradient (input, weight,
    conv bias, gamma, beta, residual) against float64 torch.nn."""
    cls_name, C, K, k, stride, pad, bias, prec, fmt, H, W = run
    dt = DTYPES[prec]
    m = getattr(rnn, cls_name)(C, K, k, stride=stride, padding=pad, bias=bias, device=device())
    m.backend = "triton"
    m.allow_tf32 = prec == "tf32"
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    m = m.to(dt).train()
    conv, bn = _nn_reference(m, bias, cls_name == "ConvBnAddReLU2d")
    res = cls_name == "ConvBnAddReLU2d"
    N = 2
    x = rand(N, C, H, W, dtype=dt, fmt=fmt).requires_grad_()
    P, Q = out_size(H, pad, pad, 1, k, stride), out_size(W, pad, pad, 1, k, stride)
    r = rand(N, K, P, Q, dtype=dt, fmt=fmt).requires_grad_() if res else None
    gout = rand(N, K, P, Q, dtype=dt, fmt=fmt)
    out = m(x, r) if res else m(x)
    out.backward(gout)

    x64 = x.detach().double().cpu().requires_grad_()
    r64 = r.detach().double().cpu().requires_grad_() if res else None
    y64 = conv(x64)
    y64.retain_grad()
    pre64 = bn(y64) + (r64 if res else 0.0)
    # The project's ReLU rule (resconv.tolerances): inside the output tolerance band around
    # zero the reference takes the mask the forward under test produced.
    out_tol = tolerances.tolerance(dt, tf32=prec == "tf32")
    o64 = pre64 * tolerances.relu_mask_for_reference(pre64, out, out_tol)
    o64.backward(gout.double().cpu())

    assert_close(out, o64, prec, "output")
    assert_close(x.grad, x64.grad, prec, "input grad")
    assert_close(m.weight.grad, conv.weight.grad, prec, "weight grad")
    assert_close(m.bn.weight.grad, bn.weight.grad, prec, "gamma grad")
    assert_close(m.bn.bias.grad, bn.bias.grad, prec, "beta grad")
    if res:
        assert_close(r.grad, r64.grad, prec, "residual grad")
    if bias:
        # The conv bias feeds BatchNorm: its exact gradient is ~0, the sum of dy cancelling;
        # the error of a sum is bounded relative to the sum of magnitudes.
        rtol = TOL[prec][0]
        bound = rtol * y64.grad.abs().sum((0, 2, 3))
        err = (m.bias.grad.double().cpu() - conv.bias.grad).abs()
        assert (err <= bound).all(), f"conv bias grad: err {err.max().item():.3e} > {bound.min().item():.3e}"
    assert x.grad.is_contiguous(memory_format=torch.channels_last if fmt == "nhwc" else torch.contiguous_format)


def test_fused_module_backward_deterministic():
    m = rnn.ConvBnAddReLU2d(16, 16, 3, padding=1, device=device()).train()
    m.backend = "triton"
    x = rand(2, 16, 7, 6, fmt="nhwc").requires_grad_()
    r = rand(2, 16, 7, 6, fmt="nhwc").requires_grad_()
    g = rand(2, 16, 7, 6, fmt="nhwc")
    grads = []
    for _ in range(2):
        for t in (x, r, m.weight, m.bn.weight, m.bn.bias):
            t.grad = None
        m(x, r).backward(g)
        grads.append([t.grad.clone() for t in (x, r, m.weight, m.bn.weight, m.bn.bias)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eval_bn", [False, True], ids=["conv_bias", "eval_bn_relu_residual"])
def test_fprop_backward_matches_torch_nn(eval_bn):
    """The eval-path op's backward (scale/shift epilogue, residual, ReLU): resconv.nn.Conv2d
    with bias, and an eval-mode ConvBnAddReLU2d whose BN parameters still take gradients."""
    C, K = 16, 24
    x = rand(2, C, 7, 6, fmt="nhwc").requires_grad_()
    gout = rand(2, K, 4, 3, fmt="nhwc")
    x64 = x.detach().double().cpu().requires_grad_()
    if not eval_bn:
        m = rnn.Conv2d(C, K, 3, stride=2, padding=1, bias=True, device=device())
        m.backend = "triton"
        ref = nn.Conv2d(C, K, 3, stride=2, padding=1, bias=True, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(m.weight.double().cpu())
            ref.bias.copy_(m.bias.double().cpu())
        m(x).backward(gout)
        ref(x64).backward(gout.double().cpu())
        pairs = [(m.weight.grad, ref.weight.grad, "weight grad"), (m.bias.grad, ref.bias.grad, "bias grad")]
    else:
        m = rnn.ConvBnAddReLU2d(C, K, 3, stride=2, padding=1, device=device())
        m.backend = "triton"
        with torch.no_grad():
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.uniform_(-0.5, 0.5)
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
        m.eval()
        conv, bn = _nn_reference(m, False, True)
        with torch.no_grad():
            bn.running_mean.copy_(m.bn.running_mean.double().cpu())
            bn.running_var.copy_(m.bn.running_var.double().cpu())
        bn.eval()
        r = rand(2, K, 4, 3, fmt="nhwc").requires_grad_()
        r64 = r.detach().double().cpu().requires_grad_()
        m(x, r).backward(gout)
        torch.relu(bn(conv(x64)) + r64).backward(gout.double().cpu())
        pairs = [(m.weight.grad, conv.weight.grad, "weight grad"), (m.bn.weight.grad, bn.weight.grad, "gamma grad"),
                 (m.bn.bias.grad, bn.bias.grad, "beta grad"), (r.grad, r64.grad, "residual grad")]
    assert_close(x.grad, x64.grad, "float32", "input grad")
    for o, r_, what in pairs:
        assert_close(o, r_, "float32", what)


def test_backward_traces_under_torch_compile():
    """The backward's custom ops have fake implementations: AOT autograd traces the whole
    training step (fullgraph) and computes the same gradients as eager."""
    m = rnn.ConvBnAddReLU2d(16, 16, 3, padding=1, device=device()).train()
    m.backend = "triton"
    x = rand(2, 16, 6, 5, fmt="nhwc").requires_grad_()
    r = rand(2, 16, 6, 5).requires_grad_()
    g = rand(2, 16, 6, 5)
    params = (x, r, m.weight, m.bn.weight, m.bn.bias)
    m(x, r).backward(g)
    eager = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    torch.compile(m, backend="aot_eager", fullgraph=True)(x, r).backward(g)
    for a, b in zip(params, eager):
        assert torch.equal(a.grad, b)


def test_saved_for_backward_no_larger_than_torch_nn():
    """A ResNet basic block of fused modules saves no more bytes for backward than the
    torch.nn block (conv-BN-ReLU(inplace)-conv-BN-add-ReLU(inplace)); storages shared
    between saved tensors count once."""
    C = 16

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    conv = lambda: nn.Conv2d(C, C, 3, padding=1, bias=False, device=device())  # noqa: E731
    c1, b1, c2, b2 = conv(), nn.BatchNorm2d(C, device=device()), conv(), nn.BatchNorm2d(C, device=device())
    relu = nn.ReLU(inplace=True)
    f1, f2 = (rnn.ConvBnReLU2d(C, C, 3, padding=1, device=device()),
              rnn.ConvBnAddReLU2d(C, C, 3, padding=1, device=device()))
    f1.backend = f2.backend = "triton"
    for fmt in ("nchw", "nhwc"):
        x = rand(4, C, 8, 8, fmt=fmt).requires_grad_()
        ours = saved_bytes(lambda: f2(f1(x), x))
        ref = saved_bytes(lambda: relu(b2(c2(relu(b1(c1(x))))) + x))
        assert ours <= ref, f"{fmt}: resconv saves {ours} B, torch.nn {ref} B"


def test_sync_bn_backward_single_rank():
    """The synchronized-BN autograd Function's backward (fused conv backward path, and the
    kernels' fused_conv_backward=False path: dy materialised, ATen's conv backward) on a
    one-rank gloo group == the op's."""
    import torch.distributed as dist

    from resconv import _conv_args as A
    from resconv.ops.autograd import SyncConvBnTrain
    from resconv.ops.triton import TritonKernels

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo" if device() == "cpu" else "nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        C, K = 16, 24
        w = rand(K, C, 3, 3).requires_grad_()
        gamma = torch.empty(K).uniform_(0.5, 1.5).to(device()).requires_grad_()
        beta = torch.empty(K).uniform_(-0.5, 0.5).to(device()).requires_grad_()
        x = rand(2, C, 7, 6, fmt="nhwc").requires_grad_()
        res = rand(2, K, 4, 3, fmt="nhwc").requires_grad_()
        g = rand(2, K, 4, 3, fmt="nhwc")
        geom = A.conv_geometry(x, w, 2, 1, 1, 1)

        results = []
        for kernels in (TritonKernels(), TritonKernels(fused_conv_backward=False)):
            for t in (x, w, gamma, beta, res):
                t.grad = None
            out = SyncConvBnTrain.apply(x, w, None, gamma, beta, res, None, None, geom, 1e-5, 0.1, True, False,
                                        dist.group.WORLD, kernels, torch.channels_last)
            out.backward(g)
            results.append([t.grad.clone() for t in (x, w, gamma, beta, res)])
        for t in (x, w, gamma, beta, res):
            t.grad = None
        from resconv.ops import triton as ops

        out = ops.conv2d_bn_train(x, w, None, gamma, beta, res, [2, 2], [1, 1, 1, 1], [1, 1], 1, 1e-5, True, False, True)[0]
        out.backward(g)
        expect = [t.grad for t in (x, w, gamma, beta, res)]
        names = ("input", "weight", "gamma", "beta", "residual")
        for got in results:
            for o, e, n in zip(got, expect, names):
                assert_close(o, e.double(), "float32", f"{n} grad")
    finally:
        dist.destroy_process_group()


# ---- the GPU compiler's rules ---------------------------------------------------------------
def test_kernels_compile_for_sm90():
    """The interpreter accepts programs the GPU compiler refuses: compile dgrad and wgrad
    (every constexpr branch, the largest autotune tile kept) for sm_90 with Triton's own
    compiler, in a process without TRITON_INTERPRET. Needs no GPU."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot_check.py")
    r = subprocess.run([sys.executable, str(script), "--arch", "90", "--quick"], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, f"GPU compile failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert r.stdout.count("OK ") >= 8, r.stdout


# ---- GPU only -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
def test_large_tensor_64bit_offsets():
    """More than 2^31 elements in x and dy: offsets must be 64-bit (compared with cuDNN)."""
    require_gpu()
    N, C, H, W, K = 2, 16, 8192, 8200, 16
    x = torch.randn(N, C, H, W, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, C, 3, 3, device="cuda", dtype=torch.float16)
    dy = torch.randn(N, K, H, W, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    args = (x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1, True, True, False)
    gx, gw, _ = conv2d_backward(dy, *args, impl="triton")
    rx, rw, _ = conv2d_backward(dy, *args, impl="aten")
    for o, r, what in ((gx, rx, "dgrad"), (gw, rw, "wgrad")):
        err = (o.float() - r.float()).abs().max().item()
        assert err <= 2e-2 * r.float().abs().max().item(), f"{what}: max err {err}"
        del o, r
