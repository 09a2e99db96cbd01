"""The bad-input catalogue: every invalid call a user can make, the exception it must raise
and the words that message must contain, generated from the one list ``BAD_CALLS``.

Each entry runs on every backend of this machine (validation is shared and happens before a
backend is chosen, so every backend must give the same error), and after each call every
tensor the caller passed is checked unmodified. Where torch has the same call (``torch``),
resconv raises torch's exception class (a subclass: ``InvalidArgumentError`` is both
RuntimeError and ValueError, ``InvalidArgumentTypeError`` both RuntimeError and TypeError)
and its message contains ATen's text; tests/test_dropin.py runs both calls side by side.
NaN/Inf inputs are not errors: they must propagate exactly where torch.nn's output has them
(``test_non_finite_inputs_propagate``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resconv
import resconv.functional as RF
import resconv.nn as rnn
from resconv import tolerances as T
from resconv._conv_args import InvalidArgumentError as IAE
from resconv._conv_args import InvalidArgumentTypeError as IATE
from conftest import test_device

BACKENDS = ["torch", "triton"]


@dataclass
class Bad:
    """One invalid call: ``call(t, backend)`` with ``t`` the fresh tensors of :func:`_tensors`.

    ``torch(t)``: the same call through torch (F.conv2d, nn.Conv2d, F.batch_norm, ...), or
    None where torch has none. ``why``: with ``torch``, why only the exception classes are
    compared (else resconv's message must contain torch's); without, why there is no
    counterpart.
    """

    id: str
    call: Callable
    exc: type
    match: str
    torch: Optional[Callable] = None
    why: str = ""


def _tensors(dev: str) -> dict:
    """Fresh random, valid operands: x [2, 4, 6, 6], w [8, 4, 3, 3] -> out [2, 8, 4, 4]."""
    t = dict(
        x=torch.randn(2, 4, 6, 6), w=torch.randn(8, 4, 3, 3), b=torch.randn(8),
        res=torch.randn(2, 8, 4, 4), rm=torch.randn(8), rv=torch.rand(8) + 0.5,
        gamma=torch.rand(8) + 0.5, beta=torch.randn(8),
    )
    return {k: v.to(dev) for k, v in t.items()}


def _bn_train(x, t, backend):
    return RF.conv_bn2d(x, t["w"], None, t["rm"], t["rv"], t["gamma"], t["beta"], training=True, backend=backend)


def _torch_bn(x, t, rm="rm", rv="rv", gamma=None, training=True):
    """The torch counterpart of a conv_bn2d call: F.batch_norm of F.conv2d."""
    return F.batch_norm(F.conv2d(x, t["w"]), t.get(rm), t.get(rv), gamma, None, training)


def _c(t):
    return t.to(torch.complex64)


PARSER = "torch's argument parser raises it, with a message listing conv2d's signatures"
RESIDUAL = "the residual is resconv's extension: torch adds it in a separate op (which broadcasts and promotes)"
ADD_RELU = "resconv's add_relu takes operands of one shape and dtype; torch.add broadcasts and promotes"

BAD_CALLS: list[Bad] = [
    # rank
    Bad("input_2d", lambda t, be: RF.conv2d(t["x"][0, 0], t["w"], backend=be), IAE,
        r"input: expected a 3-D \(unbatched\) or 4-D \(batched\) tensor, got shape \(6, 6\)",
        lambda t: F.conv2d(t["x"][0, 0], t["w"])),
    Bad("input_5d", lambda t, be: RF.conv2d(t["x"][None], t["w"], backend=be), IAE,
        r"input: expected a 3-D \(unbatched\) or 4-D \(batched\) tensor", lambda t: F.conv2d(t["x"][None], t["w"])),
    Bad("weight_3d", lambda t, be: RF.conv2d(t["x"], t["w"][:, :, 0], backend=be), IAE,
        r"weight: expected a 4-D tensor, got shape \(8, 4, 3\)", lambda t: F.conv2d(t["x"], t["w"][:, :, 0])),
    Bad("weight_5d", lambda t, be: RF.conv2d(t["x"], t["w"][None], backend=be), IAE,
        r"weight: expected a 4-D tensor", lambda t: F.conv2d(t["x"], t["w"][None])),
    Bad("weight_2d", lambda t, be: RF.conv2d(t["x"], t["w"][:, :, 0, 0], backend=be), IAE,
        r"weight: expected a 4-D tensor, got shape \(8, 4\)", lambda t: F.conv2d(t["x"], t["w"][:, :, 0, 0])),
    Bad("same_weight_3d", lambda t, be: RF.conv2d(t["x"], t["w"][:, :, 0], padding="same", backend=be), IAE,
        r"weight: expected a 4-D tensor", lambda t: F.conv2d(t["x"], t["w"][:, :, 0], padding="same")),
    # channels and groups
    Bad("channel_mismatch", lambda t, be: RF.conv2d(t["x"][:, :3], t["w"], backend=be), IAE,
        r"input: expected 4 channels \(weight.shape\[1\] \* groups = 4 \* 1\), got 3 channels",
        lambda t: F.conv2d(t["x"][:, :3], t["w"])),
    Bad("groups_not_dividing_input", lambda t, be: RF.conv2d(t["x"], t["w"][:6, :1], groups=3, backend=be), IAE,
        r"input: expected 3 channels \(weight.shape\[1\] \* groups = 1 \* 3\), got 4 channels",
        lambda t: F.conv2d(t["x"], t["w"][:6, :1], groups=3)),
    Bad("groups_not_dividing_output", lambda t, be: RF.conv2d(t["x"], t["w"][:6, :1], groups=4, backend=be), IAE,
        r"groups: out_channels=6 \(weight.shape\[0\]\) is not divisible by groups=4",
        lambda t: F.conv2d(t["x"], t["w"][:6, :1], groups=4)),
    Bad("groups_exceeding_out_channels", lambda t, be: RF.conv2d(t["x"], t["w"][:2, :1], groups=4, backend=be), IAE,
        r"weight: expected at least groups=4 output channels", lambda t: F.conv2d(t["x"], t["w"][:2, :1], groups=4)),
    Bad("groups_zero", lambda t, be: RF.conv2d(t["x"], t["w"], groups=0, backend=be), IAE,
        r"groups: expected a positive int, got 0", lambda t: F.conv2d(t["x"], t["w"], groups=0)),
    Bad("weight_zero_out_channels", lambda t, be: RF.conv2d(t["x"], t["w"][:0], backend=be), IAE,
        r"weight: expected at least groups=1 output channels \(weight.shape\[0\]\), got weight of shape "
        r"\(0, 4, 3, 3\)", lambda t: F.conv2d(t["x"], t["w"][:0])),
    # devices and dtypes
    Bad("weight_other_device", lambda t, be: RF.conv2d(t["x"], t["w"].to("meta"), backend=be), IAE,
        r"weight: expected a tensor on input's device",
        why="ATen computes a CPU result from a meta weight; for CPU and CUDA tensors it raises RuntimeError "
            "(Input type (...) and weight type (...) should be the same)"),
    Bad("weight_other_dtype", lambda t, be: RF.conv2d(t["x"], t["w"].double(), backend=be), IATE,
        r"weight: expected dtype torch.float32 \(the dtype of input\), got torch.float64",
        lambda t: F.conv2d(t["x"], t["w"].double())),
    Bad("input_integer", lambda t, be: RF.conv2d(t["x"].to(torch.int32), t["w"], backend=be), IATE,
        r"input: expected a floating or complex dtype .* got torch.int32",
        lambda t: F.conv2d(t["x"].to(torch.int32), t["w"]),
        why="ATen's text comes from the CPU kernel it picks for an integer input (expected scalar type Int but "
            "found Float); resconv computes no integer convolution"),
    Bad("weight_integer", lambda t, be: RF.conv2d(t["x"], t["w"].to(torch.int64), backend=be), IATE,
        r"weight: expected dtype torch.float32 \(the dtype of input\), got torch.int64",
        lambda t: F.conv2d(t["x"], t["w"].to(torch.int64))),
    Bad("input_complex", lambda t, be: RF.conv2d(_c(t["x"]), t["w"], backend=be), IATE,
        r"weight: expected dtype torch.complex64 \(the dtype of input\), got torch.float32",
        lambda t: F.conv2d(_c(t["x"]), t["w"])),
    Bad("weight_complex", lambda t, be: RF.conv2d(t["x"], _c(t["w"]), backend=be), IATE,
        r"weight: expected dtype torch.float32 \(the dtype of input\), got torch.complex64",
        lambda t: F.conv2d(t["x"], _c(t["w"]))),
    Bad("bias_other_dtype", lambda t, be: RF.conv2d(t["x"], t["w"], t["b"].half(), backend=be), IATE,
        r"bias: expected dtype torch.float32", lambda t: F.conv2d(t["x"], t["w"], t["b"].half())),
    Bad("bias_wrong_shape", lambda t, be: RF.conv2d(t["x"], t["w"], t["b"][:5], backend=be), IAE,
        r"bias: expected shape \(8,\) \(one value per output channel\), got \(5,\)",
        lambda t: F.conv2d(t["x"], t["w"], t["b"][:5])),
    Bad("bias_2d", lambda t, be: RF.conv2d(t["x"], t["w"], t["b"][None], backend=be), IAE,
        r"bias: expected shape \(8,\) \(one value per output channel\), got \(1, 8\)",
        lambda t: F.conv2d(t["x"], t["w"], t["b"][None])),
    # residual
    Bad("residual_wrong_shape", lambda t, be: RF.conv2d(t["x"], t["w"], residual=t["res"][:, :, :3], backend=be),
        IAE, r"residual: expected the output's shape \(2, 8, 4, 4\), got \(2, 8, 3, 4\)", why=RESIDUAL),
    Bad("residual_other_dtype", lambda t, be: RF.conv2d(t["x"], t["w"], residual=t["res"].double(), backend=be),
        IATE, r"residual: expected dtype torch.float32", why=RESIDUAL),
    Bad("residual_other_device", lambda t, be: RF.conv2d(t["x"], t["w"], residual=t["res"].to("meta"), backend=be),
        IAE, r"residual: expected a tensor on input's device", why=RESIDUAL),
    Bad("residual_integer", lambda t, be: RF.conv2d(t["x"], t["w"], residual=t["res"].int(), backend=be),
        IATE, r"residual: expected a floating or complex dtype", why=RESIDUAL),
    # geometry
    Bad("stride_zero", lambda t, be: RF.conv2d(t["x"], t["w"], stride=0, backend=be), IAE,
        r"stride: expected positive values, got 0", lambda t: F.conv2d(t["x"], t["w"], stride=0)),
    Bad("stride_negative", lambda t, be: RF.conv2d(t["x"], t["w"], stride=(1, -2), backend=be), IAE,
        r"stride: expected positive values, got \(1, -2\)", lambda t: F.conv2d(t["x"], t["w"], stride=(1, -2))),
    Bad("stride_float", lambda t, be: RF.conv2d(t["x"], t["w"], stride=1.5, backend=be), TypeError,
        r"stride: expected an int or a pair of ints, got 1.5", lambda t: F.conv2d(t["x"], t["w"], stride=1.5),
        why=PARSER),
    Bad("stride_triple", lambda t, be: RF.conv2d(t["x"], t["w"], stride=(1, 1, 1), backend=be), IATE,
        r"stride: expected an int or a pair of ints", lambda t: F.conv2d(t["x"], t["w"], stride=(1, 1, 1))),
    Bad("padding_four_values", lambda t, be: RF.conv2d(t["x"], t["w"], padding=(1, 1, 1, 1), backend=be), IATE,
        r"padding: expected an int or a pair of ints", lambda t: F.conv2d(t["x"], t["w"], padding=(1, 1, 1, 1))),
    Bad("dilation_zero", lambda t, be: RF.conv2d(t["x"], t["w"], dilation=(0, 1), backend=be), IAE,
        r"dilation: expected positive values", lambda t: F.conv2d(t["x"], t["w"], dilation=(0, 1))),
    Bad("padding_negative", lambda t, be: RF.conv2d(t["x"], t["w"], padding=-1, backend=be), IAE,
        r"padding: expected non-negative values, got -1", lambda t: F.conv2d(t["x"], t["w"], padding=-1)),
    Bad("padding_unknown_string", lambda t, be: RF.conv2d(t["x"], t["w"], padding="full", backend=be), IAE,
        r"padding: expected an int, a pair of ints, 'same' or 'valid', got 'full'",
        lambda t: F.conv2d(t["x"], t["w"], padding="full")),
    Bad("padding_same_strided", lambda t, be: RF.conv2d(t["x"], t["w"], stride=2, padding="same", backend=be),
        IAE, r"padding: 'same' needs stride 1, got stride=2", lambda t: F.conv2d(t["x"], t["w"], stride=2, padding="same")),
    Bad("padding_mode_unknown", lambda t, be: RF.conv2d(t["x"], t["w"], padding=1, padding_mode="mirror", backend=be),
        ValueError, r"padding_mode: expected one of \('zeros', 'reflect', 'replicate', 'circular'\), got 'mirror'",
        lambda t: nn.Conv2d(4, 8, 3, padding=1, padding_mode="mirror"),
        why="torch's message prints the modes as a set, in no fixed order"),
    Bad("kernel_larger_than_padded_input", lambda t, be: RF.conv2d(t["x"][:, :, :2], t["w"], backend=be),
        IAE, r"padded input size \(2 x 6\) is smaller than the dilated kernel \(3 x 3\)",
        lambda t: F.conv2d(t["x"][:, :, :2], t["w"])),
    Bad("dilated_kernel_too_large", lambda t, be: RF.conv2d(t["x"], t["w"], dilation=3, backend=be),
        IAE, r"smaller than the dilated kernel \(7 x 7\)", lambda t: F.conv2d(t["x"], t["w"], dilation=3)),
    Bad("weight_empty_kernel", lambda t, be: RF.conv2d(t["x"], t["w"][:, :, :0], backend=be), IAE,
        r"weight: expected a non-empty kernel, got shape \(8, 4, 0, 3\)", lambda t: F.conv2d(t["x"], t["w"][:, :, :0]),
        why="ATen's text comes from the kernel it picks (oneDNN's for this call; resconv quotes the CPU slow kernel's)"),
    Bad("empty_spatial_input", lambda t, be: RF.conv2d(t["x"][:, :, :0], t["w"], padding=2, backend=be), IAE,
        r"input: expected non-empty spatial dimensions", lambda t: F.conv2d(t["x"][:, :, :0], t["w"], padding=2)),
    # non-tensors
    Bad("input_list", lambda t, be: RF.conv2d(t["x"].tolist(), t["w"], backend=be), TypeError,
        r"input: expected a torch.Tensor, got list", lambda t: F.conv2d(t["x"].tolist(), t["w"]), why=PARSER),
    Bad("weight_numpy", lambda t, be: RF.conv2d(t["x"], np.zeros((8, 4, 3, 3), np.float32), backend=be), TypeError,
        r"weight: expected a torch.Tensor, got ndarray", lambda t: F.conv2d(t["x"], np.zeros((8, 4, 3, 3), np.float32)),
        why=PARSER),
    Bad("residual_float", lambda t, be: RF.conv2d(t["x"], t["w"], residual=1.0, backend=be), TypeError,
        r"residual: expected a torch.Tensor, got float", why=RESIDUAL),
    # BatchNorm
    Bad("one_value_per_channel_training", lambda t, be: _bn_train(t["x"][:1, :, :3, :3], t, be), ValueError,
        r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 8, 1, 1\]\)",
        lambda t: _torch_bn(t["x"][:1, :, :3, :3], t)),
    Bad("eval_without_running_stats",
        lambda t, be: RF.conv_bn2d(t["x"], t["w"], None, None, None, training=False, backend=be), IAE,
        r"running_mean: required when training=False", lambda t: _torch_bn(t["x"], t, None, None, training=False)),
    Bad("eval_without_running_var",
        lambda t, be: RF.conv_bn2d(t["x"], t["w"], None, t["rm"], None, training=False, backend=be), IAE,
        r"running_var: required when training=False", lambda t: _torch_bn(t["x"], t, "rm", None, training=False)),
    Bad("running_mean_wrong_shape",
        lambda t, be: RF.conv_bn2d(t["x"], t["w"], None, t["rm"][:4], t["rv"], training=True, backend=be),
        IAE, r"running_mean: expected shape \(8,\)",
        lambda t: F.batch_norm(F.conv2d(t["x"], t["w"]), t["rm"][:4], t["rv"], training=True)),
    Bad("bn_weight_wrong_shape",
        lambda t, be: RF.conv_bn2d(t["x"], t["w"], None, t["rm"], t["rv"], t["gamma"][None], training=True,
                                   backend=be), IAE, r"bn_weight: expected shape \(8,\)",
        why="F.batch_norm takes a weight of any shape with 8 elements; resconv asks for shape (8,)"),
    Bad("bn_weight_wrong_size",
        lambda t, be: RF.conv_bn2d(t["x"], t["w"], None, t["rm"], t["rv"], t["gamma"][:4], training=True,
                                   backend=be), IAE, r"bn_weight: expected shape \(8,\)",
        lambda t: _torch_bn(t["x"], t, gamma=t["gamma"][:4])),
    Bad("running_var_other_device",
        lambda t, be: RF.conv_bn2d(t["x"], t["w"], None, t["rm"], t["rv"].to("meta"), training=True, backend=be),
        IAE, r"running_var: expected a tensor on",
        lambda t: F.batch_norm(F.conv2d(t["x"], t["w"]), t["rm"], t["rv"].to("meta"), training=True),
        why="ATen's device message depends on the op and the devices"),
    Bad("scale_wrong_shape", lambda t, be: RF.conv2d(t["x"], t["w"], scale=t["gamma"][:7], backend=be), IAE,
        r"scale: expected shape \(8,\)", why="scale and shift are resconv's extension"),
    # complex tensors: the conv is defined, BatchNorm and ReLU are not (as in torch)
    Bad("complex_batchnorm",
        lambda t, be: RF.conv_bn2d(_c(t["x"]), _c(t["w"]), None, t["rm"], t["rv"], training=True), NotImplementedError,
        r"input: BatchNorm of complex tensors is not defined",
        lambda t: F.batch_norm(F.conv2d(_c(t["x"]), _c(t["w"])), t["rm"], t["rv"], training=True)),
    Bad("complex_relu", lambda t, be: RF.conv2d(_c(t["x"]), _c(t["w"]), relu=True), NotImplementedError,
        r"clamp is not supported for complex types", lambda t: torch.relu(F.conv2d(_c(t["x"]), _c(t["w"])))),
    # add_relu
    Bad("add_relu_shape", lambda t, be: RF.add_relu(t["res"], t["res"][:1], backend=be), IAE,
        r"residual: expected input's shape \(2, 8, 4, 4\), got \(1, 8, 4, 4\)", why=ADD_RELU),
    Bad("add_relu_dtype", lambda t, be: RF.add_relu(t["res"], t["res"].half(), backend=be), IATE,
        r"residual: expected dtype torch.float32", why=ADD_RELU),
    Bad("add_relu_integer", lambda t, be: RF.add_relu(t["res"].long(), t["res"].long(), backend=be), IATE,
        r"input: expected a floating or complex dtype", why="torch.relu(a + b) takes integers; resconv does not"),
    # backend choice
    Bad("backend_unknown", lambda t, be: RF.conv2d(t["x"], t["w"], backend="cudnn"), ValueError,
        r"backend: expected one of \('auto', 'torch', 'triton', 'cuda'\), got 'cudnn'", why="resconv's argument"),
    # modules
    Bad("module_wrong_channels", lambda t, be: _module(rnn.Conv2d(3, 8, 3), be)(t["x"]), IAE,
        r"input: expected 3 channels", lambda t: nn.Conv2d(3, 8, 3).to(t["x"].device)(t["x"])),
    Bad("module_missing_residual", lambda t, be: _module(rnn.ConvBnAddReLU2d(4, 8, 3), be)(t["x"], None),
        ValueError, r"residual: ConvBnAddReLU2d needs a residual tensor", why="resconv's module"),
    Bad("from_modules_channel_mismatch", lambda t, be: rnn.ConvBn2d.from_modules(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(6)),
        ValueError, r"bn: num_features=6 does not match conv.out_channels=8", why="resconv's function"),
    Bad("from_modules_not_a_conv", lambda t, be: rnn.ConvBn2d.from_modules(nn.Linear(4, 8), nn.BatchNorm2d(8)),
        TypeError, r"conv: expected a torch.nn.Conv2d, got Linear", why="resconv's function"),
    Bad("resnet_unknown_variant", lambda t, be: resconv.models.resnet18(variant="tiny"), ValueError,
        r"variant", why="resconv's function"),
]


def _module(m: nn.Module, backend: str) -> nn.Module:
    for mod in m.modules():
        if hasattr(mod, "backend"):
            mod.backend = backend
    return m.to(test_device() if backend == "triton" else "cpu")


def test_catalogue_covers_enough():
    assert len(BAD_CALLS) >= 25
    assert len({b.id for b in BAD_CALLS}) == len(BAD_CALLS), "ids must be unique"
    assert all(b.torch is not None or b.why for b in BAD_CALLS), "an entry without a torch counterpart says why"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_CALLS, ids=lambda b: b.id)
def test_bad_input_raises(bad, backend):
    dev = test_device() if backend == "triton" else "cpu"
    t = _tensors(dev)
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(bad.exc) as info:
        bad.call(t, backend)
    assert type(info.value) is bad.exc, f"expected exactly {bad.exc.__name__}, got {type(info.value).__name__}"
    assert re.search(bad.match, str(info.value)), f"message {str(info.value)!r} does not match {bad.match!r}"
    for k, v in t.items():
        assert torch.equal(v, before[k]), f"{k} was modified"


def test_forced_unavailable_backend_names_the_reason():
    t = _tensors("cpu")
    with pytest.raises(resconv.BackendUnavailableError, match=r"backend 'cuda' cannot run on a torch.float32 tensor on cpu"):
        RF.conv2d(t["x"], t["w"], backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "weight", "residual"])
def test_non_finite_inputs_propagate(where, value, relu, backend):
    """A non-finite operand is not an error: the output has NaN/Inf exactly where
    torch.nn's float64 computation has them, and is finite elsewhere (never raises)."""
    dev = test_device() if backend == "triton" else "cpu"
    t = _tensors("cpu")
    key = {"input": "x", "weight": "w", "residual": "res"}[where]
    t[key].view(-1)[3] = value
    pre = torch.nn.functional.conv2d(t["x"].double(), t["w"].double(), t["b"].double()) + t["res"].double()
    ref = torch.relu(pre) if relu else pre
    out = RF.conv2d(t["x"].to(dev), t["w"].to(dev), t["b"].to(dev), residual=t["res"].to(dev), relu=relu,
                    backend=backend).cpu()
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs from torch.nn's"
    assert torch.equal(out.isinf(), ref.isinf()), "Inf pattern differs from torch.nn's"
    assert not pre.isfinite().all(), "the case must produce a non-finite pre-activation"
    if value != value:  # NaN survives ReLU (torch.relu(nan) is nan)
        assert out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["conv2d", "conv_bn2d", "add_relu"])
def test_relu_gradient_passes_where_output_is_nan(path, backend):
    """Where a ReLU's output is NaN (here from a NaN in the residual), its gradient passes the
    incoming gradient, as torch.relu's does (ATen's threshold_backward zeroes it only where
    out <= 0): the residual's gradient there is grad_out itself, and every gradient matches
    torch.nn's float64 one. Masking with ``out > 0`` instead drops that element."""
    dev = test_device() if backend == "triton" else "cpu"
    t = _tensors("cpu")
    t["res"].view(-1)[5] = float("nan")
    t["y"] = torch.randn(2, 8, 4, 4)  # add_relu's input (the residual's shape)
    names = {"conv2d": ("x", "w", "b", "res"), "conv_bn2d": ("x", "w", "gamma", "beta", "res"),
             "add_relu": ("y", "res")}[path]
    ours = {k: t[k].to(dev).requires_grad_() for k in names}
    ref = {k: t[k].detach().double().requires_grad_() for k in names}
    F = torch.nn.functional

    def run(v, be):
        if path == "conv2d":
            if be is None:
                return torch.relu(F.conv2d(v["x"], v["w"], v["b"]) + v["res"])
            return RF.conv2d(v["x"], v["w"], v["b"], residual=v["res"], relu=True, backend=be)
        if path == "conv_bn2d":
            if be is None:
                # (no conv bias: through batch statistics its gradient is zero, up to rounding)
                z = F.batch_norm(F.conv2d(v["x"], v["w"]), None, None, v["gamma"], v["beta"], training=True)
                return torch.relu(z + v["res"])
            return RF.conv_bn2d(v["x"], v["w"], None, None, None, v["gamma"], v["beta"], training=True,
                                residual=v["res"], relu=True, allow_tf32=False, backend=be)
        return torch.relu(v["y"] + v["res"]) if be is None else RF.add_relu(v["y"], v["res"], backend=be)

    out, out_ref = run(ours, backend), run(ref, None)
    assert out.isnan().view(-1)[5] and out_ref.isnan().view(-1)[5], "the case must have a NaN output"
    grad = torch.randn(out_ref.shape)
    out.backward(grad.to(dev))
    out_ref.backward(grad.double())
    assert ref["res"].grad.view(-1)[5] == grad.view(-1)[5], "torch.nn passes the gradient where out is NaN"
    tol = T.tolerance(torch.float32, grad=True)
    for k in names:
        cmp = T.compare(ours[k].grad.cpu(), ref[k].grad, tol)
        assert cmp.ok, f"grad of {k}: {cmp}"
