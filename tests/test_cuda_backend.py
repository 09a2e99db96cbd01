"""The CUDA C++ backend: resconv._C (csrc/), resconv.ops.cuda, resconv.build.

Without a GPU (CI): the extension compiles and loads, its schemas are registered, the fake
(meta) implementations give the shapes, strides and dtypes the C++ launchers give (opcheck on
the meta device), the C++ argument checks raise clear errors, the architecture-list logic,
and backend selection never picks the cuda backend for CPU tensors.

With a GPU (marked ``gpu`` and ``cuda_ext``, skipped cleanly elsewhere): every CUDA op
against float64 references over a table of conv configurations x dtypes (fp16, bf16, fp32
with TF32, IEEE fp32) x memory formats x eval/train x residual x ReLU, every kernel and
tile forced on small shapes, training gradients and running statistics against torch.nn,
empty batches, statistics with a large common offset, opcheck on CUDA.

Tolerances (rtol, atol relative to max|ref|), the project's policy: fp32 accumulation leaves
the final rounding as the dominant error; bounds about 4x the rounding estimate, gradients
2x more. A gradient through a ReLU in fp16/bf16 also passes at no more than twice the error
of torch.nn itself in that dtype (pre-activations within rounding of zero flip sides).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

# Before the extension allocates anything: kernel outputs start as NaN, so an element a
# kernel fails to write fails its comparison.
os.environ.setdefault("RESCONV_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import resconv.functional as RF  # noqa: E402
from resconv import _conv_args as A  # noqa: E402
from resconv import build  # noqa: E402
from resconv.ops import cuda as cuda_ops  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOL = {  # key: (rtol, atol relative to max |ref|)
    "float32": (1e-5, 1e-5),
    "tf32": (4e-3, 4e-3),
    "float16": (4e-3, 2e-3),
    "bfloat16": (3e-2, 1.6e-2),
}
DTYPES = [  # (key, dtype, allow_tf32)
    ("float16", torch.float16, False),
    ("bfloat16", torch.bfloat16, False),
    ("tf32", torch.float32, True),
    ("float32", torch.float32, False),
]


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ext():
    """The loaded extension (compiled just in time into the cache on first use)."""
    problem = build.toolchain_problem()
    if problem is not None:
        pytest.skip(f"the CUDA extension cannot be compiled here: {problem}")
    cuda_ops.ops()
    return build.loaded_extension()


@pytest.fixture
def gpu(ext):
    """A CUDA device the cuda backend can run on (skips otherwise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cuda_ops.CudaBackend().unavailable_reason(torch.device("cuda"), torch.float16)
    if reason is not None:
        pytest.skip(f"the cuda backend cannot run on this GPU: {reason}")
    return torch.device("cuda")


def assert_close(name, out, ref, key, *, grad=False, baseline=None):
    """|out - ref| <= atol * max|ref| + rtol * |ref| elementwise (NaN never passes); with a
    baseline, also passes at no more than twice the baseline's largest error."""
    rtol, atol = TOL[key]
    if grad:
        rtol, atol = 2 * rtol, 2 * atol
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    scale = r.abs().max().item()
    err = (o - r).abs()
    if bool((err <= atol * scale + rtol * r.abs()).all()):
        return
    max_err = err.max().item()
    if baseline is not None:
        base_err = (baseline.detach().double().cpu() - r).abs().max().item()
        if max_err <= 2 * base_err:
            return
        raise AssertionError(f"{name}: max error {max_err:.3e} above tolerance ({key}) and above 2x torch.nn's "
                             f"own ({base_err:.3e}); max|ref| {scale:.3e}")
    raise AssertionError(f"{name}: max error {max_err:.3e} above tolerance ({key}: rtol {rtol}, atol {atol} x "
                         f"max|ref| {scale:.3e})")


def meta(*shape, dtype=torch.float16, fmt=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


# ------------------------------------------------------------------------------------------
# CPU: build, load, registration
# ------------------------------------------------------------------------------------------
def test_extension_loads_without_gpu(ext):
    assert isinstance(ext.STATS_TILE_ROWS, int) and ext.STATS_TILE_ROWS > 0
    compiled = [int(a) for a in ext.compiled_arch_list().split(",")]
    assert compiled and min(compiled) >= 800, compiled
    if Path(ext.__file__).name.startswith(build.EXT_NAME):
        # A just-in-time build: nvcc compiled exactly the requested architectures.
        wanted = build.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        assert sorted(compiled) == sorted({int(a.split("+")[0].rstrip("a").replace(".", "")) * 10 for a in wanted})


def test_ops_registered_with_schemas(ext):
    for name in cuda_ops.OPS:
        schema = getattr(torch.ops.resconv, name).default._schema
        assert schema.name == f"resconv::{name}"
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == (["running_mean", "running_var"] if name == "cuda_bn_update_running_stats_" else []), name


def test_python_fragments_coexist_with_cpp_kernels(ext):
    # The Triton ops and the cuda op schemas are Python fragments of the namespace whose cuda
    # kernels the extension registers.
    assert hasattr(torch.ops.resconv, "triton_conv2d_fprop")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resconv::cuda_conv2d_fprop", "CUDA")


def test_cuda_ops_exist_with_fakes_and_autograd_without_the_extension():
    """`import resconv` alone (no extension built or loaded) registers every cuda op's schema,
    fake implementation and autograd: a meta forward and backward run."""
    code = (
        "import torch, resconv\n"
        "from resconv import build\n"
        "names = [n for n in resconv.ops.cuda.SCHEMAS if not hasattr(torch.ops.resconv, n)]\n"
        "x = torch.empty(2, 8, 6, 6, device='meta', requires_grad=True)\n"
        "w = torch.empty(16, 8, 3, 3, device='meta', requires_grad=True)\n"
        "out = torch.ops.resconv.cuda_conv2d_fprop(x, w, None, None, None, [2, 2], [1, 1, 1, 1], [1, 1], 1, True, "
        "False, True)\n"
        "out.backward(torch.empty_like(out))\n"
        "print(names, tuple(out.shape), out.is_contiguous(memory_format=torch.channels_last), "
        "tuple(x.grad.shape), tuple(w.grad.shape), build.loaded_extension() is None)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[] (2, 16, 3, 3) True (2, 8, 6, 6) (16, 8, 3, 3) True" in res.stdout, res.stdout + res.stderr


def test_kernel_adapters_implement_the_interface():
    """Both backends' kernel adapters implement every method the shared autograd calls."""
    from resconv.ops._shared import Kernels
    from resconv.ops.triton import TritonKernels

    methods = [n for n, v in vars(Kernels).items() if callable(v) and not n.startswith("_")]
    for cls in (TritonKernels, cuda_ops.CudaKernels):
        for name in methods:
            if name == "conv_backward":  # written once in the base, on top of own_conv_backward
                continue
            assert getattr(cls, name) is not getattr(Kernels, name), f"{cls.__name__}.{name}"
        assert cls.conv_backward is Kernels.conv_backward


# ------------------------------------------------------------------------------------------
# CPU: fake (meta) implementations
# ------------------------------------------------------------------------------------------
GEOMS = [  # (N, C, H, W, K, R, S, stride, padding (t, b, l, r), dilation, groups)
    (2, 16, 9, 8, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (2, 3, 16, 15, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),
    (2, 8, 7, 9, 8, 4, 4, (1, 1), (1, 2, 1, 2), (1, 1), 1),
    (2, 8, 10, 11, 16, 3, 3, (2, 1), (2, 2, 2, 2), (2, 3), 1),
    (2, 16, 7, 7, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),
    (0, 8, 5, 5, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (3, 80, 7, 7, 72, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "x".join(map(str, g[:7])) + f"-s{g[7][0]}{g[7][1]}-g{g[10]}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_conv_shapes(ext, geom, channels_last):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = geom
    x = meta(N, C, H, W)
    w = meta(K, C // groups, R, S)
    expect = A.conv_geometry(torch.empty(N, C, H, W), torch.empty(K, C // groups, R, S), stride, padding, dilation,
                             groups).out_shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = (x, w, None, None, None, list(stride), list(padding), list(dilation), groups, True, False, channels_last)
    out = torch.ops.resconv.cuda_conv2d_fprop(*args)
    assert tuple(out.shape) == expect and out.dtype == x.dtype and out.is_contiguous(memory_format=fmt)
    out, count, mean, m2 = torch.ops.resconv.cuda_conv2d_fprop_stats(*args)
    T = math.ceil(expect[0] * expect[2] * expect[3] / ext.STATS_TILE_ROWS)
    assert tuple(out.shape) == expect and out.is_contiguous(memory_format=fmt)
    assert count.shape == (T,) and mean.shape == (T, K) and m2.shape == (T, K)
    assert count.dtype == mean.dtype == m2.dtype == torch.float32
    res = meta(*expect)
    out, y, mu, invstd, var = torch.ops.resconv.cuda_conv2d_bn_train(
        x, w, None, None, None, res, list(stride), list(padding), list(dilation), groups, 1e-5, True, False,
        channels_last)
    for t in (out, y):
        assert tuple(t.shape) == expect and t.dtype == x.dtype and t.is_contiguous(memory_format=fmt)
    for t in (mu, invstd, var):
        assert t.shape == (K,) and t.dtype == torch.float32


def _layouts(shape, dtype=torch.float16):
    """The three layouts the elementwise ops meet: NCHW, NHWC and a strided view."""
    nchw = meta(*shape, dtype=dtype)
    nhwc = meta(*shape, dtype=dtype, fmt=torch.channels_last)
    wide = meta(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    return {"nchw": nchw, "nhwc": nhwc, "strided": wide}


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_fake_elementwise_and_bn_shapes(ext, layout):
    o = torch.ops.resconv
    y = _layouts((2, 6, 5, 7))[layout]
    fmt = A.memory_format_of(y)
    K = y.shape[1]
    vec = torch.empty(K, device="meta")
    out = o.cuda_scale_shift_act(y, vec, vec, None, True)
    assert out.shape == y.shape and out.dtype == y.dtype and out.is_contiguous(memory_format=fmt)
    out = o.cuda_add_relu(y, y, True)
    assert out.shape == y.shape and out.is_contiguous(memory_format=fmt)
    sum_g, sum_gy = o.cuda_bn_backward_reduce(y, y, y, vec, True)
    assert sum_g.shape == sum_gy.shape == (K,) and sum_g.dtype == torch.float32
    grad = meta(*y.shape, dtype=y.dtype)  # NCHW gradient: the result follows `out`'s layout
    for dy_dtype in (y.dtype, torch.float32):
        dy, gres = o.cuda_bn_backward_dy(grad, y, y, vec, vec, vec, vec, True, True, dy_dtype)
        assert dy.dtype == dy_dtype and dy.is_contiguous(memory_format=fmt) and gres.is_contiguous(memory_format=fmt)
        assert gres.dtype == grad.dtype and gres.shape == y.shape
    dy, gres = o.cuda_bn_backward_dy(grad, None, None, vec, None, None, None, False, False, y.dtype)
    assert dy.is_contiguous() and gres.numel() == 0
    T = 5
    stats = o.cuda_bn_finalize(torch.empty(T, device="meta"), torch.empty(T, K, device="meta"),
                               torch.empty(T, K, device="meta"), vec, vec, 1e-5)
    assert len(stats) == 5 and all(s.shape == (K,) and s.dtype == torch.float32 for s in stats)
    assert o.cuda_bn_update_running_stats_(vec, None, vec, vec, 0.1) is None


def _opcheck_cases():
    x = meta(2, 8, 6, 5, fmt=torch.channels_last)
    w = meta(16, 8, 3, 3)
    k = torch.empty(16, device="meta")
    y = meta(2, 16, 6, 5, fmt=torch.channels_last)
    geo = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    cnt, pm = torch.empty(3, device="meta"), torch.empty(3, 16, device="meta")
    return {
        "cuda_conv2d_fprop": (x, w, k, k, y, *geo, True, False, True),
        "cuda_conv2d_fprop_stats": (x, w, None, k, None, *geo, False, True, False),
        "cuda_conv2d_bn_train": (x, w, k, k, k, y, *geo, 1e-5, True, False, True),
        "cuda_bn_finalize": (cnt, pm, pm, k, None, 1e-5),
        "cuda_bn_update_running_stats_": (k.clone(), k.clone(), k, k, 0.1),
        "cuda_scale_shift_act": (y, k, k, y, True),
        "cuda_add_relu": (y, y, True),
        "cuda_bn_backward_reduce": (y, y, y, k, True),
        "cuda_bn_backward_dy": (y, y, y, k, k, k, k, True, True, torch.float32),
    }


@pytest.mark.parametrize("name", cuda_ops.OPS)
def test_opcheck_meta(ext, name):
    args = _opcheck_cases()[name]
    torch.library.opcheck(getattr(torch.ops.resconv, name).default, args)


@pytest.mark.parametrize("name", ["cuda_conv2d_fprop", "cuda_conv2d_bn_train", "cuda_add_relu"])
def test_opcheck_meta_autograd(ext, name):
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.dim() >= 1 else a
                 for a in _opcheck_cases()[name])
    torch.library.opcheck(getattr(torch.ops.resconv, name).default, args)


# ------------------------------------------------------------------------------------------
# CPU: argument validation in the C++ launchers (the CPU registration checks, then refuses)
# ------------------------------------------------------------------------------------------
def _conv_args(**over):
    a = dict(x=torch.randn(2, 8, 6, 6), w=torch.randn(16, 8, 3, 3), scale=None, shift=None, res=None,
             stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1)
    a.update(over)
    return (a["x"], a["w"], a["scale"], a["shift"], a["res"], a["stride"], a["padding"], a["dilation"], a["groups"],
            True, False, False)


VALIDATION = [
    ("conv_channels", "cuda_conv2d_fprop", lambda: _conv_args(w=torch.randn(16, 4, 3, 3)), ValueError,
     r"weight: expected weight.shape\[1\] == C / groups = 8"),
    ("conv_int_input", "cuda_conv2d_fprop", lambda: _conv_args(x=torch.ones(2, 8, 6, 6, dtype=torch.int32)),
     TypeError, "input: expected dtype float16, bfloat16 or float32, got Int"),
    ("conv_float64", "cuda_conv2d_fprop", lambda: _conv_args(x=torch.randn(2, 8, 6, 6, dtype=torch.float64)),
     TypeError, "input: expected dtype float16, bfloat16 or float32, got Double"),
    ("conv_weight_dtype", "cuda_conv2d_fprop", lambda: _conv_args(w=torch.randn(16, 8, 3, 3).half()), TypeError,
     r"weight: expected dtype Float \(the dtype of input\), got Half"),
    ("conv_input_rank", "cuda_conv2d_fprop", lambda: _conv_args(x=torch.randn(8, 6, 6)), ValueError,
     r"input: expected a 4-D tensor \[N, C, H, W\]"),
    ("conv_stride", "cuda_conv2d_fprop", lambda: _conv_args(stride=[0, 1]), ValueError, "stride: expected two positive"),
    ("conv_dilation", "cuda_conv2d_fprop", lambda: _conv_args(dilation=[1, 1, 1]), ValueError,
     "dilation: expected two positive"),
    ("conv_padding", "cuda_conv2d_fprop", lambda: _conv_args(padding=[1, 1]), ValueError,
     r"padding: expected four non-negative ints \(top, bottom, left, right\)"),
    ("conv_groups", "cuda_conv2d_fprop", lambda: _conv_args(groups=3, w=torch.randn(16, 3, 3, 3)), ValueError,
     "weight: expected weight.shape"),
    ("conv_groups_zero", "cuda_conv2d_fprop", lambda: _conv_args(groups=0), ValueError, r"groups: expected an int in"),
    ("conv_kernel_too_big", "cuda_conv2d_fprop", lambda: _conv_args(w=torch.randn(16, 8, 9, 9)), ValueError,
     r"padded input size \(8 x 8\) is smaller than the dilated kernel \(9 x 9\)"),
    ("conv_scale_shape", "cuda_conv2d_fprop", lambda: _conv_args(scale=torch.randn(15)), ValueError,
     r"scale: expected shape \[16\]"),
    ("conv_residual_shape", "cuda_conv2d_fprop", lambda: _conv_args(res=torch.randn(2, 16, 5, 6)), ValueError,
     r"residual: expected the output's shape \[2, 16, 6, 6\]"),
    ("conv_on_cpu", "cuda_conv2d_fprop", lambda: _conv_args(), RuntimeError,
     "input: expected a CUDA tensor, got a tensor on cpu"),
    ("stats_on_cpu", "cuda_conv2d_fprop_stats", lambda: _conv_args(), RuntimeError, "cuda_conv2d_fprop_stats: input"),
    ("train_bn_weight", "cuda_conv2d_bn_train",
     lambda: (torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3), None, torch.randn(8), None, None, [1, 1],
              [1, 1, 1, 1], [1, 1], 1, 1e-5, True, False, False), ValueError, r"bn_weight: expected shape \[16\]"),
    ("finalize_dtype", "cuda_bn_finalize",
     lambda: (torch.ones(3, dtype=torch.float64), torch.randn(3, 4), torch.rand(3, 4), None, None, 1e-5), TypeError,
     "count: expected float32"),
    ("finalize_rows", "cuda_bn_finalize", lambda: (torch.ones(2), torch.randn(3, 4), torch.rand(3, 4), None, None,
                                                   1e-5), ValueError, r"count: expected 3 partials"),
    ("running_not_contiguous", "cuda_bn_update_running_stats_",
     lambda: (torch.zeros(8)[::2], None, torch.zeros(4), torch.ones(4), 0.1), ValueError,
     "running_mean: expected a contiguous tensor to update in place"),
    ("apply_a_without_b", "cuda_scale_shift_act", lambda: (torch.randn(2, 4, 3, 3), torch.ones(4), None, None, True),
     ValueError, "a, b: expected both or neither"),
    ("add_relu_dtype", "cuda_add_relu", lambda: (torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3).half(), True),
     TypeError, r"residual: expected dtype Float \(the dtype of input\)"),
    ("reduce_y_shape", "cuda_bn_backward_reduce",
     lambda: (torch.randn(2, 4, 3, 3), None, torch.randn(2, 4, 3, 2), None, False), ValueError,
     r"y: expected the shape of grad_out"),
    ("dy_relu_needs_out", "cuda_bn_backward_dy",
     lambda: (torch.randn(2, 4, 3, 3), None, None, torch.ones(4), None, None, None, True, False, torch.float32),
     ValueError, "out: required when relu=True"),
    ("dy_dtype", "cuda_bn_backward_dy",
     lambda: (torch.randn(2, 4, 3, 3).half(), None, None, torch.ones(4), None, None, None, False, False,
              torch.float64), TypeError, r"dy_dtype: expected grad_out's dtype \(Half\) or float32"),
    ("dy_needs_coefficients", "cuda_bn_backward_dy",
     lambda: (torch.randn(2, 4, 3, 3), None, torch.randn(2, 4, 3, 3), torch.ones(4), None, None, None, False, False,
              torch.float32), ValueError, "b, c, mean: required when y is given"),
]


@pytest.mark.parametrize("case", VALIDATION, ids=lambda c: c[0])
def test_cpp_argument_validation(ext, case):
    _, name, make_args, exc, message = case
    with pytest.raises(exc, match=message) as info:
        getattr(torch.ops.resconv, name)(*make_args())
    assert f"resconv::{name}" in str(info.value)


# ------------------------------------------------------------------------------------------
# CPU: build logic
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (None, ["8.0", "9.0"]),
    ("", ["8.0", "9.0"]),
    ("8.0;9.0", ["8.0", "9.0"]),
    ("8.0 9.0+PTX", ["8.0", "9.0+PTX"]),
    ("9.0a", ["9.0a"]),
    ("8.6, 8.6,8.9", ["8.6", "8.9"]),
    ("Ampere;Hopper", ["8.0", "8.6", "9.0"]),
])
def test_parse_arch_list(value, expected):
    assert build.parse_arch_list(value) == expected


@pytest.mark.parametrize("value, message", [("7.5", "older than sm_80"), ("sm_90", "is not an architecture"),
                                            ("Volta", "is not an architecture"), ("9.0;6.1+PTX", "older than sm_80")])
def test_parse_arch_list_rejects(value, message):
    with pytest.raises(ValueError, match=message):
        build.parse_arch_list(value)


def test_gencode_flags():
    assert build.gencode_flags(["8.0", "9.0"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                  "-gencode=arch=compute_90,code=sm_90"]
    assert build.gencode_flags(["9.0a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert build.gencode_flags(["8.6+PTX"]) == ["-gencode=arch=compute_86,code=sm_86",
                                                "-gencode=arch=compute_86,code=compute_86"]
    flags = build.build_flags(["8.0"])
    # torch.utils.cpp_extension adds no arch flags of its own (it would query the GPU) when
    # ours are there: it looks for 'arch' in the flags.
    assert any("arch" in f for f in flags["nvcc"])
    for d in build.wheel_include_dirs():
        assert Path(d).is_dir() and d in flags["nvcc"] and d in flags["cxx"]


def test_find_cuda_home(monkeypatch, tmp_path):
    fake = tmp_path / "cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "include").mkdir()
    (fake / "bin" / "nvcc").write_text("")
    (fake / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(fake))
    assert build.find_cuda_home() == str(fake)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no toolkit there: not taken
    assert build.find_cuda_home() != str(tmp_path)


def test_toolchain_problem(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "torch.version.cuda is None" in build.toolchain_problem()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    assert "set CUDA_HOME" in build.toolchain_problem()


def test_setup_py_is_pure_python_without_switch():
    code = ("import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__'); "
            "print('torch imported:', 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RESCONV_BUILD_CUDA"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch imported: False" in res.stdout


def test_jit_can_be_disabled():
    import resconv

    if list(Path(resconv.__file__).parent.glob("_C*.so")):
        pytest.skip("an ahead-of-time build of resconv._C is installed")
    code = ("from resconv import build\ntry:\n    build.load_extension()\nexcept RuntimeError as e:\n    print(e)\n")
    env = dict(os.environ, RESCONV_CUDA_JIT="0")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "RESCONV_CUDA_JIT=0 forbids compiling it now" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------
# CPU: backend selection
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_auto_never_picks_cuda_for_cpu_tensors(monkeypatch, dtype):
    monkeypatch.delenv("RESCONV_BACKEND", raising=False)
    x = torch.randn(1, 2, 3, 3).to(dtype)
    assert RF.select_backend(None, x).name != "cuda"
    assert RF.select_backend("auto", x).name != "cuda"


def test_forcing_cuda_on_cpu_names_the_reason():
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    with pytest.raises(RF.BackendUnavailableError, match="backend 'cuda' cannot run .* needs a CUDA tensor"):
        RF.conv2d(x, w, backend="cuda")
    with pytest.raises(RF.BackendUnavailableError, match="dtype torch.float64 is not supported"):
        RF.conv2d(x.double(), w.double(), backend="cuda")


def test_no_gpu_never_triggers_a_build(monkeypatch):
    """available_backends("cuda") on a machine with nvcc and no GPU answers at once, without
    compiling the extension (it used to spend a minute building it to find no driver)."""
    def fail():
        raise AssertionError("the extension must not be built or loaded without a usable GPU")

    monkeypatch.setattr(build, "load_extension", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = cuda_ops.CudaBackend().unavailable_reason(torch.device("cuda"), torch.float16)
    assert "no usable CUDA device" in reason


def test_cpu_tensors_never_trigger_a_build(monkeypatch):
    def fail():
        raise AssertionError("the extension must not be loaded for a CPU tensor")

    monkeypatch.setattr(build, "load_extension", fail)
    reason = cuda_ops.CudaBackend().unavailable_reason(torch.device("cpu"), torch.float16)
    assert "needs a CUDA tensor" in reason


def test_unavailable_extension_is_the_cause(monkeypatch):
    boom = RuntimeError("nvcc exploded")

    def fail():
        raise boom

    backend = cuda_ops.CudaBackend()
    monkeypatch.setattr(cuda_ops, "ops", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine whose build fails
    monkeypatch.setitem(RF.BACKENDS, "cuda", backend)
    fake_cuda_tensor = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16)
    with pytest.raises(RF.BackendUnavailableError, match="nvcc exploded") as info:
        RF.select_backend("cuda", fake_cuda_tensor)
    assert info.value.__cause__ is boom and backend.cause is boom
    # "auto" moves on (a stub stands in for Triton, which would query the missing GPU).
    monkeypatch.delenv("RESCONV_BACKEND", raising=False)
    stub = types.SimpleNamespace(name="triton", cause=None, unavailable_reason=lambda device, dtype: "stubbed out")
    monkeypatch.setitem(RF.BACKENDS, "triton", stub)
    assert RF.select_backend(None, fake_cuda_tensor).name == "torch"


# ------------------------------------------------------------------------------------------
# GPU: conformance of every op against float64 references
# ------------------------------------------------------------------------------------------
# name -> (N, C, H, W, K, kernel, nn.Conv2d keyword arguments). Small shapes with partial
# tiles, several row tiles, reduction slices that straddle (r, s) taps, odd channel counts.
CONV_CASES = {
    "3x3": (2, 16, 9, 8, 24, 3, dict(padding=1)),
    "1x1_stride2": (2, 16, 9, 9, 32, 1, dict(stride=2)),
    "stem_7x7_rgb": (2, 3, 16, 15, 16, 7, dict(stride=2, padding=3)),
    "same_even_4x4": (2, 8, 7, 9, 8, 4, dict(padding="same")),
    "dilation_2x3": (2, 8, 10, 11, 16, 3, dict(dilation=(2, 3), padding=2)),
    "stride_2x1_pad_1x2": (2, 8, 9, 6, 16, 3, dict(stride=(2, 1), padding=(1, 2))),
    "groups_2_cg8": (2, 16, 7, 7, 32, 3, dict(padding=1, groups=2)),
    "groups_4_cg4": (2, 16, 7, 7, 16, 3, dict(padding=1, groups=4)),
    "depthwise": (2, 16, 8, 8, 16, 3, dict(padding=1, groups=16)),
    "odd_channels": (2, 5, 9, 7, 7, 3, dict(padding=1)),
    "multi_tile": (3, 80, 7, 7, 72, 3, dict(padding=1)),
    "wide_k": (2, 64, 12, 12, 160, 3, dict(padding=1)),
    "kernel_eq_input": (3, 8, 5, 5, 8, 5, dict()),
}
FORCED_KERNELS = ["tc128x128", "tc128x64", "tc64x64", "simt"]
FORCED_CASES = ["3x3", "stem_7x7_rgb", "multi_tile", "wide_k", "groups_2_cg8"]


def _geometry(case):
    N, C, H, W, K, k, kw = CONV_CASES[case]
    w_shape = (K, C // kw.get("groups", 1), k, k)
    x0 = torch.empty(N, C, H, W)
    g = A.conv_geometry(x0, torch.empty(w_shape), kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                        kw.get("groups", 1))
    return N, C, H, W, w_shape, kw, g


def _input(shape, dtype, fmt, dev, scale=1.0, offset=0.0):
    if fmt == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64) * scale + offset
        return wide.to(dtype).to(dev)[..., ::2]
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(dev)
    return t.contiguous(memory_format=torch.channels_last) if fmt == "nhwc" else t


def _conv64(x, w, g):
    t, b, l, r = g.padding
    return F.conv2d(F.pad(x.double().cpu(), (l, r, t, b)), w.double().cpu(), None, g.stride, 0, g.dilation, g.groups)


@pytest.fixture
def precision(request, monkeypatch):
    """(key, dtype, allow_tf32); IEEE float32 also keeps cuDNN's backward off TF32."""
    key, dtype, tf32 = request.param
    if key == "float32":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return key, dtype, tf32


def _eval_case(gpu, case, precision, fmt, epilogue, residual_fmt=None):
    key, dtype, tf32 = precision
    N, C, H, W, w_shape, kw, g = _geometry(case)
    x = _input((N, C, H, W), dtype, fmt, gpu)
    w = _input(w_shape, dtype, "nchw", gpu, scale=1.0 / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))
    bias = scale = shift = res = None
    if epilogue in ("bn", "all"):
        bias = _input((g.K,), dtype, "nchw", gpu)
        scale = torch.rand(g.K, device=gpu) + 0.5
        shift = torch.randn(g.K, device=gpu)
    if epilogue in ("res", "all"):
        res = _input(g.out_shape, dtype, residual_fmt or fmt, gpu)
    relu = epilogue in ("relu", "all")
    out = RF.conv2d(x, w, bias, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1),
                    scale=scale, shift=shift, residual=res, relu=relu, allow_tf32=tf32, backend="cuda")
    y = _conv64(x, w, g)
    if bias is not None:
        y = y + bias.double().cpu().view(1, -1, 1, 1)
    if scale is not None:
        y = y * scale.double().cpu().view(1, -1, 1, 1) + shift.double().cpu().view(1, -1, 1, 1)
    if res is not None:
        y = y + res.double().cpu()
    if relu:
        y = torch.relu(y)
    assert out.dtype == dtype and out.is_contiguous(memory_format=A.memory_format_of(x))
    assert_close(f"{case} out", out, y, key)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("epilogue", ["plain", "bn", "res", "relu", "all"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("precision", DTYPES, ids=[d[0] for d in DTYPES], indirect=True)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_gpu_conv_eval(gpu, case, precision, fmt, epilogue):
    _eval_case(gpu, case, precision, fmt, epilogue)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("precision", DTYPES, ids=[d[0] for d in DTYPES], indirect=True)
@pytest.mark.parametrize("kernel", FORCED_KERNELS)
@pytest.mark.parametrize("case", FORCED_CASES)
def test_gpu_conv_every_kernel(gpu, monkeypatch, case, kernel, precision, fmt):
    monkeypatch.setenv("RESCONV_CUDA_CONV_KERNEL", kernel)
    _eval_case(gpu, case, precision, fmt, "all")


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("precision", DTYPES[:1], ids=["float16"], indirect=True)
def test_gpu_residual_in_another_layout(gpu, precision):
    _eval_case(gpu, "3x3", precision, "nhwc", "all", residual_fmt="nchw")
    _eval_case(gpu, "3x3", precision, "nchw", "all", residual_fmt="nhwc")


def _bn_module(K, dev):
    bn = torch.nn.BatchNorm2d(K, momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("res_relu", [False, True], ids=["plain", "res+relu"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("precision", DTYPES, ids=[d[0] for d in DTYPES], indirect=True)
@pytest.mark.parametrize("case", [c for c in CONV_CASES if CONV_CASES[c][0] > 0])
def test_gpu_conv_bn_train(gpu, case, precision, fmt, res_relu):
    """Output, every gradient and the running statistics after two steps, against torch.nn
    (Conv2d -> BatchNorm2d -> + residual -> ReLU) in float64 on the same rounded inputs."""
    key, dtype, tf32 = precision
    N, C, H, W, w_shape, kw, g = _geometry(case)
    conv = torch.nn.Conv2d(C, g.K, w_shape[2], bias=True, groups=g.groups, dilation=kw.get("dilation", 1),
                           stride=kw.get("stride", 1), padding=kw.get("padding", 0)).double()
    bn = _bn_module(g.K, gpu)
    with torch.no_grad():  # parameters representable in the test dtype
        conv.weight.copy_(conv.weight.to(dtype).double())
        conv.bias.copy_(conv.bias.to(dtype).double())
    weight = conv.weight.detach().to(dtype).to(gpu).requires_grad_()
    bias = conv.bias.detach().to(dtype).to(gpu).requires_grad_()
    gamma = bn.weight.detach().float().to(gpu).requires_grad_()
    beta = bn.bias.detach().float().to(gpu).requires_grad_()
    rm, rv = bn.running_mean.float().to(gpu), bn.running_var.float().to(gpu)
    baseline = None
    if res_relu and dtype in (torch.float16, torch.bfloat16):
        import copy

        baseline = (copy.deepcopy(conv).to(dtype).to(gpu), copy.deepcopy(bn).to(dtype).to(gpu))
    for step in range(2):
        x = _input((N, C, H, W), dtype, fmt, gpu).requires_grad_()
        res = _input(g.out_shape, dtype, fmt, gpu).requires_grad_() if res_relu else None
        out = RF.conv_bn2d(x, weight, bias, rm, rv, gamma, beta, training=True, momentum=0.1, eps=1e-5,
                           stride=kw.get("stride", 1), padding=kw.get("padding", 0), dilation=kw.get("dilation", 1),
                           groups=g.groups, residual=res, relu=res_relu, allow_tf32=tf32, backend="cuda")
        grad = _input(g.out_shape, dtype, fmt, gpu)
        out.backward(grad)
        # float64 torch.nn on the same rounded values
        x64 = x.detach().double().cpu().requires_grad_()
        r64 = res.detach().double().cpu().requires_grad_() if res_relu else None
        for p in (*conv.parameters(), *bn.parameters()):
            p.grad = None
        ref = bn(conv(x64))
        if res_relu:
            ref = torch.relu(ref + r64)
        ref.backward(grad.double().cpu())
        base = {}
        if baseline is not None:
            bconv, bbn = baseline
            for p in (*bconv.parameters(), *bbn.parameters()):
                p.grad = None
            xb = x.detach().clone().requires_grad_()
            rb = res.detach().clone().requires_grad_()
            torch.relu(bbn(bconv(xb)) + rb).backward(grad)
            base = {"x": xb.grad, "res": rb.grad, "weight": bconv.weight.grad, "bias": bconv.bias.grad,
                    "gamma": bbn.weight.grad, "beta": bbn.bias.grad}
        assert out.dtype == dtype and out.is_contiguous(memory_format=A.memory_format_of(x))
        assert_close(f"{case} step {step} out", out, ref, key)
        grads = {"x": (x.grad, x64.grad), "weight": (weight.grad, conv.weight.grad), "bias": (bias.grad, conv.bias.grad),
                 "gamma": (gamma.grad, bn.weight.grad), "beta": (beta.grad, bn.bias.grad)}
        if res_relu:
            grads["res"] = (res.grad, r64.grad)
        for name, (ours, theirs) in grads.items():
            assert_close(f"{case} step {step} grad {name}", ours, theirs, key, grad=True, baseline=base.get(name))
        for t in (weight, bias, gamma, beta):
            t.grad = None
        assert_close(f"{case} step {step} running_mean", rm, bn.running_mean, key)
        assert_close(f"{case} step {step} running_var", rv, bn.running_var, key)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_empty_batch(gpu, dtype):
    x = torch.randn(0, 8, 5, 5, device=gpu, dtype=dtype)
    w = torch.randn(16, 8, 3, 3, device=gpu, dtype=dtype)
    out = RF.conv2d(x, w, padding=1, relu=True, backend="cuda")
    assert out.shape == (0, 16, 5, 5)
    rm, rv = torch.zeros(16, device=gpu), torch.ones(16, device=gpu)
    out = RF.conv_bn2d(x, w, None, rm, rv, training=True, padding=1, relu=True, backend="cuda")
    assert out.shape == (0, 16, 5, 5) and bool((rm == 0).all()) and bool((rv == 1).all())
    o = torch.ops.resconv
    geo = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    out, count, mean, m2 = o.cuda_conv2d_fprop_stats(x, w, None, None, None, *geo, False, False, True)
    assert out.shape == (0, 16, 5, 5) and count.shape == (0,) and mean.shape == (0, 16) == m2.shape
    g = torch.randn(0, 16, 5, 5, device=gpu, dtype=dtype)
    sum_g, sum_gy = o.cuda_bn_backward_reduce(g, g, g, torch.zeros(16, device=gpu), True)
    assert bool((sum_g == 0).all()) and bool((sum_gy == 0).all())


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_statistics_with_large_offset(gpu, dtype, fmt):
    """y = conv + 1e4 with conv ~ N(0, 144): E[y^2] - E[y]^2 in fp32 would be off by about
    fp32's ulp at 1e8 (8) against a variance of ~144; Chan-merged partials must not be."""
    x = _input((4, 16, 12, 12), dtype, fmt, gpu)
    w = _input((32, 16, 3, 3), dtype, "nchw", gpu)
    bias = torch.full((32,), 1e4, device=gpu, dtype=dtype)
    out, y, mean, invstd, var_u = torch.ops.resconv.cuda_conv2d_bn_train(
        x, w, bias, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 1e-5, False, False, fmt == "nhwc")
    # + the bias as stored: 1e4 rounds to 9984 in bfloat16
    y64 = _conv64(x, w, A.conv_geometry(x, w, 1, 1, 1, 1)) + bias.double().cpu().view(1, -1, 1, 1)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    n = y64.numel() // y64.shape[1]
    torch.testing.assert_close(mean.double().cpu(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var_u.double().cpu(), var64 * n / (n - 1), rtol=1e-4, atol=0)
    torch.testing.assert_close(invstd.double().cpu(), torch.rsqrt(var64 + 1e-5), rtol=1e-4, atol=0)
    key = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    ref = (y64 - mean64.view(1, -1, 1, 1)) * torch.rsqrt(var64 + 1e-5).view(1, -1, 1, 1)
    # y itself is stored in the input dtype: rounding 1e4 + N(0, 144) to fp16/bf16 moves each
    # element by up to ulp(1e4) / 2 (4 and 32), i.e. up to 0.3 / 2.7 standard deviations.
    if dtype == torch.float32:
        assert_close("normalised output", out, ref, key)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("precision", DTYPES, ids=[d[0] for d in DTYPES], indirect=True)
@pytest.mark.parametrize("case", ["3x3", "multi_tile", "stem_7x7_rgb", "groups_4_cg4"])
def test_gpu_statistics_partials(gpu, case, precision):
    """Each partial row t holds (count, mean, M2) of y over output pixels [t*rows, (t+1)*rows)
    of the N*P*Q order, for every channel."""
    key, dtype, tf32 = precision
    N, C, H, W, w_shape, kw, g = _geometry(case)
    x = _input((N, C, H, W), dtype, "nhwc", gpu)
    w = _input(w_shape, dtype, "nchw", gpu)
    scale, shift = torch.rand(g.K, device=gpu) + 0.5, torch.randn(g.K, device=gpu)
    out, count, mean, m2 = torch.ops.resconv.cuda_conv2d_fprop_stats(
        x, w, scale, shift, None, list(g.stride), list(g.padding), list(g.dilation), g.groups, False, tf32, True)
    y64 = _conv64(x, w, g) * scale.double().cpu().view(1, -1, 1, 1) + shift.double().cpu().view(1, -1, 1, 1)
    rows = y64.permute(0, 2, 3, 1).reshape(-1, g.K)  # [N*P*Q, K] in the kernel's row order
    per = build.loaded_extension().STATS_TILE_ROWS
    T = math.ceil(rows.shape[0] / per)
    assert count.shape == (T,)
    torch.testing.assert_close(count.cpu().double(),
                               torch.tensor([min(per, rows.shape[0] - t * per) for t in range(T)], dtype=torch.float64))
    for t in range(T):
        seg = rows[t * per:(t + 1) * per]
        var, mu = torch.var_mean(seg, dim=0, correction=0)
        assert_close(f"partial {t} mean", mean[t], mu, key)
        assert_close(f"partial {t} m2", m2[t], var * seg.shape[0], key)
    assert_close("out", out, y64, key)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_bn_finalize_and_running_stats(gpu):
    from resconv import reference

    T, K = 37, 70
    count = torch.randint(1, 65, (T,), device=gpu).float()
    pmean = torch.randn(T, K, device=gpu) * 3 + 100
    pm2 = torch.rand(T, K, device=gpu) * count[:, None]
    gamma, beta = torch.rand(K, device=gpu) + 0.5, torch.randn(K, device=gpu)
    mean, invstd, var_u, a, b = torch.ops.resconv.cuda_bn_finalize(count, pmean, pm2, gamma, beta, 1e-5)
    n, mu, m2 = reference.combine_moments(count.double().cpu(), pmean.double().cpu(), pm2.double().cpu())
    var = m2 / n
    torch.testing.assert_close(mean.double().cpu(), mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd.double().cpu(), torch.rsqrt(var + 1e-5), rtol=1e-5, atol=0)
    torch.testing.assert_close(var_u.double().cpu(), m2 / (n - 1), rtol=1e-5, atol=0)
    torch.testing.assert_close(a, gamma * invstd)
    torch.testing.assert_close(b, beta - mean * a)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        rm0, rv0 = torch.randn(K, device=gpu).to(dt), torch.rand(K, device=gpu).to(dt)
        rm, rv = rm0.clone(), rv0.clone()
        torch.ops.resconv.cuda_bn_update_running_stats_(rm, rv, mean, var_u, 0.25)
        torch.testing.assert_close(rm, (rm0.double() * 0.75 + mean.double() * 0.25).to(dt))
        torch.testing.assert_close(rv, (rv0.double() * 0.75 + var_u.double() * 0.25).to(dt))
        rm = rm0.clone()
        torch.ops.resconv.cuda_bn_update_running_stats_(rm, None, mean, var_u, 0.25)
        torch.testing.assert_close(rm, (rm0.double() * 0.75 + mean.double() * 0.25).to(dt))


def _dense(shape, dtype, fmt, dev, offset=0):
    """NCHW / NHWC dense, or (offset=1) a view one element into a larger buffer: misaligned
    for the vector path, so the scalar path runs."""
    n = math.prod(shape)
    base = torch.randn(n + offset, device=dev).to(dtype)[offset:]
    if fmt == "nhwc":
        N, C, H, W = shape
        return base.view(N, H, W, C).permute(0, 3, 1, 2)
    return base.view(shape)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("offset", [0, 1], ids=["vector", "scalar"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_elementwise(gpu, dtype, fmt, offset):
    key = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    shape = (3, 5, 7, 8)  # numel % 4 == 0: the vector path runs unless misaligned
    K = shape[1]
    ch = lambda v: v.double().cpu().view(1, -1, 1, 1)  # noqa: E731
    y, res, g, out = (_dense(shape, dtype, fmt, gpu, offset) for _ in range(4))
    a, b, c = torch.randn(K, device=gpu), torch.randn(K, device=gpu), torch.randn(K, device=gpu)
    mean = torch.randn(K, device=gpu)
    o = torch.ops.resconv
    got = o.cuda_scale_shift_act(y, a, b, res, True)
    assert_close("scale_shift_act", got, torch.relu(y.double().cpu() * ch(a) + ch(b) + res.double().cpu()), key)
    assert got.is_contiguous(memory_format=A.memory_format_of(y))
    assert_close("add_relu", o.cuda_add_relu(y, res, False), y.double().cpu() + res.double().cpu(), key)
    mask = out.double().cpu() > 0
    g64 = g.double().cpu() * mask
    for dy_dtype in (dtype, torch.float32):
        dy, gres = o.cuda_bn_backward_dy(g, out, y, a, b, c, mean, True, True, dy_dtype)
        ref = ch(a) * g64 + ch(b) * (y.double().cpu() - ch(mean)) + ch(c)
        assert dy.dtype == dy_dtype and dy.is_contiguous(memory_format=A.memory_format_of(out))
        assert_close("bn_backward_dy dy", dy, ref, key)
        assert_close("bn_backward_dy grad_residual", gres, g64, key)
    sum_g, sum_gy = o.cuda_bn_backward_reduce(g, out, y, mean, True)
    assert_close("sum_g", sum_g, g64.sum((0, 2, 3)), "float32" if dtype == torch.float32 else "tf32")
    assert_close("sum_gy", sum_gy, (g64 * (y.double().cpu() - ch(mean))).sum((0, 2, 3)),
                 "float32" if dtype == torch.float32 else "tf32")
    sum_g, sum_gy = o.cuda_bn_backward_reduce(g, None, None, None, False)
    assert_close("sum_g (no relu)", sum_g, g.double().cpu().sum((0, 2, 3)), "tf32")
    assert bool((sum_gy == 0).all())


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_backward_reduce_mixed_layouts_and_large(gpu):
    """Gradient and saved tensors in different layouts; several row blocks and channel blocks."""
    shape = (8, 40, 17, 19)
    g = torch.randn(shape, device=gpu)
    out = torch.randn(shape, device=gpu).contiguous(memory_format=torch.channels_last)
    y = torch.randn(shape, device=gpu)
    mean = torch.randn(40, device=gpu)
    sum_g, sum_gy = torch.ops.resconv.cuda_bn_backward_reduce(g, out, y, mean, True)
    g64 = g.double().cpu() * (out.double().cpu() > 0)
    torch.testing.assert_close(sum_g.double().cpu(), g64.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    ref = (g64 * (y.double().cpu() - mean.double().cpu().view(1, -1, 1, 1))).sum((0, 2, 3))
    torch.testing.assert_close(sum_gy.double().cpu(), ref, rtol=1e-5, atol=1e-4)
    again = torch.ops.resconv.cuda_bn_backward_reduce(g, out, y, mean, True)
    assert torch.equal(again[0], sum_g) and torch.equal(again[1], sum_gy)  # fixed order: bitwise


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("name", cuda_ops.OPS)
def test_gpu_opcheck(gpu, name):
    def to_gpu(a):
        if not isinstance(a, torch.Tensor):
            return a
        t = torch.randn(a.shape, dtype=a.dtype).to(gpu)
        if name == "cuda_bn_finalize" and a.dim() == 1:
            t = torch.randint(1, 65, a.shape, device=gpu).float()
        if name == "cuda_bn_finalize" and a.dim() == 2:
            t = t.abs()
        return t.contiguous(memory_format=torch.channels_last) if a.dim() == 4 and a.stride(1) == 1 else t

    args = tuple(to_gpu(a) for a in _opcheck_cases()[name])
    torch.library.opcheck(getattr(torch.ops.resconv, name).default, args)
    if name in ("cuda_conv2d_fprop", "cuda_conv2d_bn_train", "cuda_add_relu"):
        grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                          else a for a in args)
        torch.library.opcheck(getattr(torch.ops.resconv, name).default, grad_args)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_auto_picks_cuda(gpu, monkeypatch):
    monkeypatch.delenv("RESCONV_BACKEND", raising=False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert RF.select_backend(None, torch.empty(1, device=gpu, dtype=dtype)).name == "cuda"
    assert RF.select_backend(None, torch.empty(1, device=gpu, dtype=torch.float64)).name != "cuda"


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("relu", [False, True])
def test_gpu_sync_bn_with_cuda_kernels(gpu, monkeypatch, relu):
    """SyncConvBnTrain driven by the CUDA kernels namespace, on a one-process NCCL group,
    against the float64 reference (forward, running statistics, gradients)."""
    import torch.distributed as dist

    from resconv import reference
    from resconv.ops.autograd import SyncConvBnTrain

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # IEEE fp32 dgrad/wgrad too
    owns = not dist.is_initialized()
    if owns:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        x = torch.randn(4, 16, 9, 9, device=gpu).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(24, 16, 3, 3, device=gpu) / 12).requires_grad_()
        gamma = (torch.rand(24, device=gpu) + 0.5).requires_grad_()
        beta = torch.randn(24, device=gpu).requires_grad_()
        rm, rv = torch.zeros(24, device=gpu), torch.ones(24, device=gpu)
        g = A.conv_geometry(x, w, 1, 1, 1, 1)
        out = SyncConvBnTrain.apply(x, w, None, gamma, beta, None, rm, rv, g, 1e-5, 0.1, relu, False, group,
                                    cuda_ops.KERNELS, torch.channels_last)
        grad = torch.randn_like(out)
        out.backward(grad)
        leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w, gamma, beta)]
        rm64, rv64 = torch.zeros(24, dtype=torch.float64), torch.ones(24, dtype=torch.float64)
        ref = reference.conv_bn2d_train(leaves[0], leaves[1], None, leaves[2], leaves[3], rm64, rv64, 0.1, 1e-5,
                                        None, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu)
        ref.backward(grad.double().cpu())
        assert_close("sync out", out, ref, "float32")
        assert_close("sync running_mean", rm, rm64, "float32")
        assert_close("sync running_var", rv, rv64, "float32")
        for name, t, r in zip(("x", "w", "gamma", "beta"), (x, w, gamma, beta), leaves):
            assert_close(f"sync grad {name}", t.grad, r.grad, "float32", grad=True)
    finally:
        if owns:
            dist.destroy_process_group()
