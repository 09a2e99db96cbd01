"""torch.library registration of the Triton ops (opcheck: schema, fake tensors, autograd
registration, AOT dispatch), and the backend choice of resconv.functional."""
from __future__ import annotations

import os

import pytest
import torch

import resconv
import resconv.functional as RF
from resconv.ops import triton as TO
from conftest import test_device

DEV = test_device()


def _t(*shape, grad=True, cl=False):
    t = torch.randn(*shape, device=DEV)
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


OPCHECK_CASES = {
    "fprop_full_epilogue": (
        torch.ops.resconv.triton_conv2d_fprop.default,
        lambda: (_t(2, 8, 6, 5, cl=True), _t(16, 8, 3, 3), _t(16).detach().abs().requires_grad_(), _t(16), _t(2, 16, 6, 5),
                 [1, 1], [1, 1, 1, 1], [1, 1], 1, True, False, True),
    ),
    "fprop_plain_nchw_strided": (
        torch.ops.resconv.triton_conv2d_fprop.default,
        lambda: (_t(2, 4, 7, 7), _t(8, 2, 3, 2), None, None, None, [2, 1], [0, 1, 1, 0], [1, 2], 2, False, False, False),
    ),
    "fprop_nchw_input_channels_last_output": (  # torch's rule for a channels_last weight
        torch.ops.resconv.triton_conv2d_fprop.default,
        lambda: (_t(2, 4, 5, 6), _t(8, 4, 3, 3, cl=True), None, _t(8), _t(2, 8, 5, 6), [1, 1], [1, 1, 1, 1], [1, 1], 1,
                 True, False, True),
    ),
    "bn_train_residual_relu": (
        torch.ops.resconv.triton_conv2d_bn_train.default,
        lambda: (_t(2, 8, 5, 6, cl=True), _t(16, 8, 3, 3), _t(16), _t(16), _t(16), _t(2, 16, 5, 6),
                 [1, 1], [1, 1, 1, 1], [1, 1], 1, 1e-5, True, False, True),
    ),
    "bn_train_plain": (
        torch.ops.resconv.triton_conv2d_bn_train.default,
        lambda: (_t(3, 4, 6, 6), _t(8, 4, 1, 1), None, None, None, None, [2, 2], [0, 0, 0, 0], [1, 1], 1, 1e-3,
                 False, False, False),
    ),
    "add_relu": (
        torch.ops.resconv.triton_add_relu.default,
        lambda: (_t(2, 4, 3, 5, cl=True), _t(2, 4, 3, 5, cl=True), True),
    ),
    "running_stats_update": (
        torch.ops.resconv.triton_bn_update_running_stats_.default,
        lambda: (_t(16, grad=False), _t(16, grad=False).abs(), _t(16, grad=False), _t(16, grad=False).abs(), 0.1),
    ),
    "running_stats_update_mean_only": (
        torch.ops.resconv.triton_bn_update_running_stats_.default,
        lambda: (_t(16, grad=False), None, _t(16, grad=False), _t(16, grad=False).abs(), 0.1),
    ),
    "bn_backward_reduce": (
        torch.ops.resconv.triton_bn_backward_reduce.default,
        lambda: (_t(2, 8, 4, 4, grad=False), _t(2, 8, 4, 4, grad=False), _t(2, 8, 4, 4, grad=False),
                 _t(8, grad=False), True, False),
    ),
    "bn_backward_reduce_writes_g": (
        torch.ops.resconv.triton_bn_backward_reduce.default,
        lambda: (_t(2, 8, 4, 4, grad=False, cl=True), _t(2, 8, 4, 4, grad=False, cl=True), None, None, True, True),
    ),
    "bn_backward_dy": (
        torch.ops.resconv.triton_bn_backward_dy.default,
        lambda: (_t(2, 8, 4, 4, grad=False, cl=True), _t(2, 8, 4, 4, grad=False, cl=True),
                 _t(2, 8, 4, 4, grad=False, cl=True), _t(8, grad=False), _t(8, grad=False), _t(8, grad=False),
                 _t(8, grad=False), True, True, torch.float32),
    ),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    op, make_args = OPCHECK_CASES[name]
    torch.library.opcheck(op, make_args())


def test_running_stats_mutation_is_declared():
    schema = torch.ops.resconv.triton_bn_update_running_stats_.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"running_mean", "running_var"}


def test_auto_backend_on_cpu_is_torch_or_triton_interpreter():
    x = torch.randn(1, 2, 3, 3)
    chosen = RF.select_backend(None, x).name
    assert chosen == ("triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch")
    assert RF.select_backend("torch", x).name == "torch"


def test_float64_auto_falls_back_to_torch():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    assert RF.select_backend(None, x).name == "torch"


def test_forced_unavailable_backend_raises_with_reason():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(resconv.BackendUnavailableError, match="float64"):
        RF.conv2d(x, torch.randn(2, 2, 1, 1, dtype=torch.float64), backend="triton")
    with pytest.raises(resconv.BackendUnavailableError, match="cuda"):
        RF.conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), backend="cuda")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        RF.conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), backend="cudnn")


def test_env_variable_chooses_backend(monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    monkeypatch.setenv("RESCONV_BACKEND", "torch")
    assert RF.select_backend(None, x).name == "torch"
    monkeypatch.setenv("RESCONV_BACKEND", "nope")
    with pytest.raises(ValueError, match="RESCONV_BACKEND|backend"):
        RF.select_backend(None, x)


def test_available_backends_reports_reasons():
    av = resconv.available_backends("cpu", torch.float32)
    assert av["torch"] is None
    assert set(av) == {"torch", "triton", "cuda"}
    assert all(v is None or isinstance(v, str) and v for v in av.values())


def test_import_registers_every_op():
    """A cached compiled graph (Inductor's FX cache, another process) may call any op first:
    every Triton op and every cuda op schema exists right after `import resconv`, without the
    CUDA extension being built or loaded."""
    import subprocess
    import sys

    names = ["triton_conv2d_fprop", "triton_conv2d_bn_train", "triton_add_relu", "triton_bn_update_running_stats_",
             "triton_bn_backward_reduce", "triton_bn_backward_dy", "triton_conv2d_dgrad", "triton_conv2d_wgrad",
             "cuda_conv2d_fprop", "cuda_conv2d_fprop_stats", "cuda_conv2d_bn_train", "cuda_bn_finalize",
             "cuda_bn_update_running_stats_", "cuda_scale_shift_act", "cuda_add_relu", "cuda_bn_backward_reduce",
             "cuda_bn_backward_dy", "cuda_conv2d_dgrad", "cuda_conv2d_wgrad"]
    code = (f"import torch, resconv; from resconv import build; names = {names!r}; "
            "print([n for n in names if not hasattr(torch.ops.resconv, n)], build.loaded_extension() is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True", out.stderr


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, resconv; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_statistics_are_finite_and_running_stats_untouched(backend):
    """N*P*Q = 0: the training op returns an empty output and finite statistics (mean 0,
    variance 1: the identity normalisation, not 0/0 = NaN), and a backend's training call
    leaves running_mean/running_var untouched, as torch.nn.BatchNorm2d does."""
    from resconv._conv_args import conv_geometry
    from resconv.ops import BACKENDS

    x, w = torch.randn(0, 4, 5, 5, device=DEV), torch.randn(8, 4, 3, 3, device=DEV)
    gamma, beta = torch.rand(8, device=DEV) + 0.5, torch.randn(8, device=DEV)
    if backend == "triton":
        out, y, mean, invstd, var_u = torch.ops.resconv.triton_conv2d_bn_train(
            x, w, None, gamma, beta, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 1e-5, True, False, False)
        assert out.shape == y.shape == (0, 8, 5, 5)
        torch.testing.assert_close(mean.cpu(), torch.zeros(8))
        torch.testing.assert_close(var_u.cpu(), torch.ones(8))
        torch.testing.assert_close(invstd.cpu(), torch.full((8,), (1 + 1e-5) ** -0.5))
    bn = torch.nn.BatchNorm2d(8).to(DEV).train()
    rm, rv = torch.randn(8, device=DEV), torch.rand(8, device=DEV) + 0.5
    bn.running_mean.copy_(rm)
    bn.running_var.copy_(rv)
    ref = bn(torch.nn.functional.conv2d(x, w, padding=1))
    g = conv_geometry(x, w, 1, 1, 1, 1)
    out = BACKENDS[backend].conv_bn_train(x, w, None, gamma, beta, rm, rv, 0.1, 1e-5, None, g, True, False, None)
    assert out.shape == ref.shape == (0, 8, 5, 5)
    assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var), "running statistics changed"
