"""The Hopper kernels (CUTLASS 3 sm90 implicit GEMM, wgmma + TMA: csrc/hopper_*.cu) and the
switch that lets the cuda backend use them (RESCONV_CUDA_HOPPER, off by default).

Without a GPU (CI):
  * the plan (csrc/hopper_plan.h, through resconv._C: the very C++ the launchers run): which
    calls the Hopper kernels serve — ResNet-18's layers and every rule's edge — and why not;
  * the switch: its parsing, its default (off: backend="auto" never prefers the path before it
    has run on a GPU), and the backward's routing with it on (dy materialised once, then
    dgrad/wgrad without the prologue), on meta tensors;
  * for a build with sm_90a: the kernels are in it and their SASS holds HGMMA and UTMALDG
    (benchmarks/sass_sm90.py --check, the step CI runs).
With an H100/H200 (marked ``gpu`` and ``cuda_ext``): every Hopper kernel forced
(RESCONV_CUDA_CONV_KERNEL=hopper) against float64 references — fprop's three epilogues
(eval, + residual, training statistics partials), dgrad, wgrad — and the cuda backend's
training step with the switch on against torch.nn.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("RESCONV_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from resconv import build  # noqa: E402
from resconv import tolerances as T  # noqa: E402
from resconv.ops import cuda as cuda_ops  # noqa: E402
from resconv.ops import cuda_extension  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# CPU: the plan
# ------------------------------------------------------------------------------------------
H100 = dict(cc_major=9, cc_minor=0, sm_count=132, compiled=True, enabled=True)


def call(op="fprop", *, N=32, C=64, H=56, W=56, K=64, R=3, S=3, stride=1, pad=1, dil=1, groups=1,
         dtype="float16", **over):
    """A HopperCall for a conv of these sizes (P, Q derived as torch.nn.Conv2d does)."""
    P = (H + 2 * pad - dil * (R - 1) - 1) // stride + 1
    Q = (W + 2 * pad - dil * (S - 1) - 1) // stride + 1
    c = dict(op=op, dtype=dtype, tf32=False, N=N, C=C, H=H, W=W, K=K, R=R, S=S, P=P, Q=Q, groups=groups,
             stride_h=stride, stride_w=stride, pad_t=pad, pad_b=pad, pad_l=pad, pad_r=pad, dil_h=dil, dil_w=dil,
             out_channels_last=True, prologue=False, stats_with_epilogue=False, **H100)
    c.update(over)
    return c


# ResNet-18 at 224 x 224, batch 32: (name, conv sizes) -> expected (fprop, dgrad, wgrad) service
RESNET18 = [
    ("stem 7x7/2, C=3 (padded to 8)", dict(C=3, H=224, W=224, K=64, R=7, S=7, stride=2, pad=3), (True, False, False)),
    ("layer1 3x3, 64", dict(C=64, H=56, W=56, K=64), (True, True, False)),
    ("layer2 3x3/2, 64->128", dict(C=64, H=56, W=56, K=128, stride=2), (True, False, False)),
    ("layer2 1x1/2 downsample", dict(C=64, H=56, W=56, K=128, R=1, S=1, stride=2, pad=0), (True, False, False)),
    ("layer2 3x3, 128", dict(C=128, H=28, W=28, K=128), (True, True, False)),
    ("layer3 3x3, 256", dict(C=256, H=14, W=14, K=256), (True, True, False)),
    ("layer4 3x3, 512", dict(C=512, H=7, W=7, K=512), (True, True, True)),
]


@pytest.mark.parametrize("name, sizes, expected", RESNET18, ids=[r[0] for r in RESNET18])
def test_plan_serves_resnet18_layers(ext, name, sizes, expected):
    """fprop everywhere (16-bit, channels-last); dgrad at unit stride only (CUTLASS 4.2's sm90
    dgrad); wgrad only where dW has at least a wave of 128x64 tiles (no split-K for conv in
    CUTLASS's sm90 kernels: the hand-written kernel splits N*P*Q)."""
    got = tuple(cuda_extension.hopper_plan(**call(op, **sizes)) is None for op in ("fprop", "dgrad", "wgrad"))
    assert got == expected, {op: cuda_extension.hopper_plan(**call(op, **sizes)) for op in ("fprop", "dgrad", "wgrad")}


REFUSALS = [
    ("switched off", call(enabled=False), "switched off"),
    ("not compiled", call(compiled=False), "no sm_90a kernels"),
    ("an A100", call(cc_major=8, cc_minor=0), "compute capability 9.0"),
    ("an RTX 4090", call(cc_major=8, cc_minor=9), "compute capability 9.0"),
    ("float32 (TF32)", call(dtype="float32", tf32=True), "float16 and bfloat16 only"),
    ("grouped", call(groups=2), "groups > 1"),
    ("K not a multiple of 8", call(K=60), "multiples of 8"),
    ("dgrad with C not a multiple of 8", call("dgrad", C=20), "multiples of 8"),
    ("NCHW output", call(out_channels_last=False), "not channels-last"),
    ("dgrad with the fused prologue", call("dgrad", prologue=True), "prologue"),
    ("wgrad with the fused prologue", call("wgrad", C=512, K=512, H=7, W=7, prologue=True), "prologue"),
    ("statistics with a residual", call(stats_with_epilogue=True), "statistics with a scale"),
    ("stride 9", call(stride=9, H=64, W=64), "stride > 8"),
    ("padding 256", call(pad=256), "padding > 255"),
    ("padding 129: corner -129", call(pad=129), "corner"),
    ("dilated 7x7, offset 258", call(R=7, S=7, dil=43, pad=0, H=300, W=300), "dilation > 254"),
    ("2^31 output rows", call(N=2**20, H=48, W=48), "2^31 - 1 rows"),
]


@pytest.mark.parametrize("name, c, reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_plan_refusals_name_the_rule(ext, name, c, reason):
    why = cuda_extension.hopper_plan(**c)
    assert why is not None and reason in why, why


def test_plan_edges(ext):
    # corners at the limits of TMA im2col (2-D: [-128, 127]) and the filter offset (< 255)
    assert cuda_extension.hopper_plan(**call(pad=128, H=300, W=300)) is None
    assert cuda_extension.hopper_plan(**call(R=7, S=7, dil=42, pad=126, H=300, W=300)) is None  # offset 252
    assert cuda_extension.hopper_plan(**call(stride=8, H=64, W=64)) is None
    # fprop pads C (groups == 1) to a multiple of 8; dgrad and wgrad do not
    assert cuda_extension.hopper_plan(**call(C=20)) is None
    assert cuda_extension.hopper_plan(**call("wgrad", C=20, K=512, H=7, W=7)) is not None
    with pytest.raises(TypeError, match="missing fields"):
        cuda_extension.hopper_plan(op="fprop")


# ------------------------------------------------------------------------------------------
# CPU: the build
# ------------------------------------------------------------------------------------------
def test_build_compiles_the_hopper_kernels_only_for_sm90a(monkeypatch):
    """9.0a in the list: the CUTLASS headers (from the pinned nvidia-cutlass wheel) and
    RESCONV_SM90A (csrc/hopper_*.cu compile their CUTLASS code only then), with the CUTLASS
    version in a define so that another CUTLASS rebuilds; without 9.0a nothing of it."""
    assert build.hopper_requested(["8.0", "9.0a"]) and not build.hopper_requested(["8.0", "9.0"])
    assert build.hopper_flags(["8.0", "9.0"]) == []
    monkeypatch.setattr(build, "cutlass_include_dirs", lambda: ["/x/include", "/x/tools/util/include"])
    monkeypatch.setattr(build, "cutlass_version", lambda: "4.2.0.0")
    flags = build.build_flags(["8.0", "9.0a"])["nvcc"]
    for f in ("-I/x/include", "-I/x/tools/util/include", "-DRESCONV_SM90A", "-DRESCONV_CUTLASS_VERSION=4_2_0_0",
              "-gencode=arch=compute_90a,code=sm_90a"):
        assert f in flags, f
    monkeypatch.setattr(build, "cutlass_include_dirs", lambda: [])
    with pytest.raises(RuntimeError, match=r"need the CUTLASS headers: pip install 'nvidia-cutlass==4.2.0.0'"):
        build.build_flags(["9.0a"])


def test_cutlass_headers_are_found_from_the_pinned_wheel():
    dirs = build.cutlass_include_dirs()
    if not dirs:
        pytest.skip("nvidia-cutlass is not installed (pip install -e '.[cuda]')")
    assert (Path(dirs[0]) / "cutlass" / "conv" / "kernel" / "sm90_implicit_gemm_tma_warpspecialized.hpp").is_file()
    assert (Path(dirs[1]) / "cutlass" / "util" / "packed_stride.hpp").is_file()
    assert build.CUTLASS_REQUIREMENT == f"nvidia-cutlass=={build.cutlass_version()}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert pyproject.count(f'"{build.CUTLASS_REQUIREMENT}"') == 2, "the cuda and test extras pin the same CUTLASS"


# ------------------------------------------------------------------------------------------
# CPU: the switch
# ------------------------------------------------------------------------------------------
def test_switch_default_is_off(monkeypatch):
    """backend="auto" must never prefer a path that has not run on a GPU: off by default."""
    monkeypatch.delenv(cuda_extension.HOPPER_ENV, raising=False)
    assert cuda_extension.HOPPER_DEFAULT is False
    assert cuda_extension.hopper_requested() is False


@pytest.mark.parametrize("value, expected", [("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False),
                                             (" false ", False)])
def test_switch_parsing(monkeypatch, value, expected):
    monkeypatch.setenv(cuda_extension.HOPPER_ENV, value)
    assert cuda_extension.hopper_requested() is expected


def test_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(cuda_extension.HOPPER_ENV, "yes please")
    with pytest.raises(ValueError, match="RESCONV_CUDA_HOPPER: expected 0 or 1"):
        cuda_extension.hopper_requested()


def test_switch_reaches_the_extension(ext):
    before = ext.hopper_switch()
    try:
        cuda_extension.set_hopper(True)
        assert ext.hopper_switch() and cuda_extension.hopper_enabled()
        cuda_extension.set_hopper(False)
        assert not ext.hopper_switch() and not cuda_extension.hopper_enabled()
    finally:
        ext.set_hopper(before)


def test_extension_loads_with_the_switch_from_the_environment():
    code = ("import resconv; from resconv.ops import cuda_extension as ce, cuda; cuda.ops(); "
            "print(ce.loaded().hopper_switch())")
    env = dict(os.environ, RESCONV_CUDA_HOPPER="1")
    if build.toolchain_problem() is not None:
        pytest.skip("the CUDA extension cannot be compiled here")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("hopper", [False, True])
def test_backward_materialises_dy_for_the_hopper_kernels(ext, monkeypatch, hopper):
    """With the Hopper kernels on, the training backward forms dy once (cuda_bn_backward_dy)
    and hands it to dgrad and wgrad without the prologue (they read a materialised dy);
    off, the prologue goes to the hand-written kernels' loads. Meta tensors: the routing only."""
    monkeypatch.setattr(cuda_ops.KERNELS, "fused_conv_backward", True)
    monkeypatch.setattr(cuda_extension, "hopper_enabled", lambda: hopper)
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(torch.ops.resconv, name)

            def run(*args):
                calls.append((name, args))
                return fn(*args)
            return run

    monkeypatch.setattr(cuda_ops, "_ops_for", lambda t: Spy())
    meta = lambda *s, **kw: torch.empty(s, device="meta", **kw).requires_grad_()  # noqa: E731
    x = meta(2, 8, 6, 5, dtype=torch.float16).contiguous(memory_format=torch.channels_last).detach().requires_grad_()
    w, bias = meta(16, 8, 3, 3, dtype=torch.float16), meta(16, dtype=torch.float16)
    gamma, beta = meta(16), meta(16)
    out = torch.ops.resconv.cuda_conv2d_bn_train(x, w, bias, gamma, beta, None, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                                 1e-5, True, False, True)[0]
    out.backward(torch.empty_like(out))
    names = [n for n, _ in calls]
    dgrad = next(args for n, args in calls if n == "cuda_conv2d_dgrad")
    wgrad = next(args for n, args in calls if n == "cuda_conv2d_wgrad")
    prologue_args = dgrad[2:8] + wgrad[2:8]  # relu_out, y, a, b, c, mean of both
    if hopper:
        assert "cuda_bn_backward_dy" in names and names.index("cuda_bn_backward_dy") < names.index("cuda_conv2d_dgrad")
        assert all(a is None for a in prologue_args)
    else:
        assert "cuda_bn_backward_dy" not in names
        assert dgrad[4] is not None and wgrad[4] is not None  # a: the prologue is fused
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


# ------------------------------------------------------------------------------------------
# CPU: the machine code of a build with sm_90a
# ------------------------------------------------------------------------------------------
def test_hopper_kernels_hold_wgmma_and_tma(ext):
    """Every Hopper kernel (fprop eval / + residual / statistics, dgrad, wgrad; float16 and
    bfloat16) is in the extension and its SASS holds HGMMA and UTMALDG, without spills."""
    if not ext.hopper_compiled():
        pytest.skip("this build has no sm_90a kernels (TORCH_CUDA_ARCH_LIST lacks 9.0a)")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sass_sm90.py"), "--so", ext.__file__, "--check"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]


# ------------------------------------------------------------------------------------------
# GPU (H100 / H200): the Hopper kernels forced, against float64
# ------------------------------------------------------------------------------------------
@pytest.fixture
def hopper_gpu(ext, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100 / H200)")
    if not ext.hopper_compiled():
        pytest.skip("this build has no sm_90a kernels")
    before = ext.hopper_switch()
    ext.set_hopper(True)
    monkeypatch.setenv("RESCONV_CUDA_CONV_KERNEL", "hopper")  # fail, never fall back silently
    yield torch.device("cuda")
    ext.set_hopper(before)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _rand(shape, dtype, dev, scale=1.0, offset=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(dev)


def _close(name, out, ref, dtype, grad=False, floor=0.0):
    tol = T.tolerance(dtype, grad=grad)
    scale = ref.abs().max().item() or 1.0
    cmp = T.compare(out.cpu(), ref, T.Tolerance(tol.rtol, tol.atol + floor / scale))
    assert cmp.ok, f"{name}: {cmp}"


GPU_CASES = {  # name: (N, C, H, W, K, R, stride, pad, dil)
    "3x3": (2, 64, 14, 13, 128, 3, 1, 1, 1),
    "1x1_stride2": (3, 32, 15, 15, 64, 1, 2, 0, 1),
    "stem_7x7_rgb": (2, 3, 40, 38, 64, 7, 2, 3, 1),
    "dilated_partial_tiles": (2, 40, 11, 9, 72, 3, 1, 2, 2),
}


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("variant", ["eval", "residual", "stats"])
def test_gpu_hopper_fprop(hopper_gpu, case, dtype, variant):
    dev = hopper_gpu
    N, C, H, W, K, R, s, p, d = GPU_CASES[case]
    x, w = _cl(_rand((N, C, H, W), dtype, dev)), _rand((K, C, R, R), dtype, dev, scale=(C * R * R) ** -0.5)
    geo = ([s, s], [p, p, p, p], [d, d], 1)
    y64 = F.conv2d(x.double().cpu(), w.double().cpu(), None, s, p, d)
    ch = lambda v: v.double().cpu().view(1, -1, 1, 1)  # noqa: E731
    if variant == "stats":
        shift = torch.randn(K, device=dev) + 3.0
        out, count, mean, m2 = torch.ops.resconv.cuda_conv2d_fprop_stats(x, w, None, shift, None, *geo, False, False,
                                                                         True)
        ref = y64 + ch(shift)
        _close("y", out, ref, dtype)
        rows = ref.permute(0, 2, 3, 1).reshape(-1, K)
        per = build.loaded_extension().STATS_TILE_ROWS
        assert count.shape == (math.ceil(rows.shape[0] / per),)
        for t in range(count.shape[0]):
            seg = rows[t * per:(t + 1) * per]
            var, mu = torch.var_mean(seg, dim=0, correction=0)
            assert count[t].item() == seg.shape[0]
            _close(f"partial {t} mean", mean[t], mu, torch.float32, floor=1e-5 * mu.abs().max().item())
            _close(f"partial {t} m2", m2[t], var * seg.shape[0], torch.float32, floor=1e-4 * (var.max().item() + 1))
        return
    scale, shift = torch.rand(K, device=dev) + 0.5, torch.randn(K, device=dev)
    res = _cl(_rand(tuple(y64.shape), dtype, dev)) if variant == "residual" else None
    out = torch.ops.resconv.cuda_conv2d_fprop(x, w, scale, shift, res, *geo, True, False, True)
    ref = y64 * ch(scale) + ch(shift) + (res.double().cpu() if res is not None else 0)
    _close("out", out, torch.relu(ref), dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["3x3", "dilated_partial_tiles"])
def test_gpu_hopper_dgrad(hopper_gpu, case, dtype):
    dev = hopper_gpu
    N, C, H, W, K, R, s, p, d = GPU_CASES[case]
    w = _rand((K, C, R, R), dtype, dev)
    P = (H + 2 * p - d * (R - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (R - 1) - 1) // s + 1
    g = _cl(_rand((N, K, P, Q), dtype, dev))
    dx = torch.ops.resconv.cuda_conv2d_dgrad(g, w, None, None, None, None, None, None, [N, C, H, W], [s, s],
                                             [p, p, p, p], [d, d], 1, True, False)
    ref = torch.nn.grad.conv2d_input((N, C, H, W), w.double().cpu(), g.double().cpu(), s, p, d)
    _close("dgrad", dx, ref, dtype, grad=True)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("weight_channels_last", [False, True])
def test_gpu_hopper_wgrad(hopper_gpu, dtype, weight_channels_last):
    dev = hopper_gpu  # dW of 4 x 8 x 9 = 288 tiles >= 132 SMs: the plan sends it to the Hopper kernel
    N, C, H, W, K = 2, 512, 7, 7, 512
    x = _cl(_rand((N, C, H, W), dtype, dev))
    g = _cl(_rand((N, K, H, W), dtype, dev))
    gw, gb = torch.ops.resconv.cuda_conv2d_wgrad(g, x, None, None, None, None, None, None, [K, C, 3, 3], [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, True, weight_channels_last, False)
    ref = torch.nn.grad.conv2d_weight(x.double().cpu(), (K, C, 3, 3), g.double().cpu(), 1, 1)
    _close("wgrad", gw, ref, dtype, grad=True)
    _close("bias grad", gb, g.double().cpu().sum((0, 2, 3)), dtype, grad=True)
    assert gw.is_contiguous(memory_format=torch.channels_last if weight_channels_last else torch.contiguous_format)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_hopper_training_step_matches_torch_nn(hopper_gpu, monkeypatch, dtype):
    """The cuda backend's fused Conv-BN-ReLU training step with the Hopper kernels on (and the
    backend's own conv backward, which then materialises dy for them) against torch.nn in
    float64: output, every gradient, the running statistics."""
    import resconv.functional as RF

    monkeypatch.delenv("RESCONV_CUDA_CONV_KERNEL")  # the plan decides per conv (stride-1 here: Hopper)
    monkeypatch.setattr(cuda_ops.KERNELS, "fused_conv_backward", True)
    dev = hopper_gpu
    N, C, H, W, K = 4, 64, 12, 12, 64
    x = _cl(_rand((N, C, H, W), dtype, dev)).requires_grad_()
    w = _rand((K, C, 3, 3), dtype, dev, scale=(9 * C) ** -0.5).requires_grad_()
    gamma = (torch.rand(K, device=dev) + 0.5).requires_grad_()
    beta = torch.randn(K, device=dev).requires_grad_()
    rm, rv = torch.zeros(K, device=dev), torch.ones(K, device=dev)
    out = RF.conv_bn2d(x, w, None, rm, rv, gamma, beta, True, 0.1, 1e-5, 1, 1, relu=True, backend="cuda")
    g = _cl(_rand(tuple(out.shape), dtype, dev))
    out.backward(g)
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    g64, b64 = gamma.detach().double().cpu().requires_grad_(), beta.detach().double().cpu().requires_grad_()
    rm64, rv64 = torch.zeros(K, dtype=torch.float64), torch.ones(K, dtype=torch.float64)
    ref = torch.relu(F.batch_norm(F.conv2d(x64, w64, None, 1, 1), rm64, rv64, g64, b64, True, 0.1, 1e-5))
    ref.backward(g.double().cpu())
    _close("out", out, ref, dtype)
    for name, ours, theirs in (("x", x.grad, x64.grad), ("w", w.grad, w64.grad), ("gamma", gamma.grad, g64.grad),
                               ("beta", beta.grad, b64.grad)):
        _close(f"grad {name}", ours, theirs, dtype, grad=True)
    _close("running_mean", rm, rm64, dtype)
    _close("running_var", rv, rv64, dtype)
