"""Drop-in conformance: torch.nn.Conv2d's documented behaviour run through resconv.nn.Conv2d
and resconv.functional.conv2d side by side with torch, on the torch and Triton backends.

* Errors: every call of the bad-input catalogue (tests/test_bad_inputs.py) that torch also
  has, run through both: the same exception class (resconv's may subclass torch's) and a
  message containing ATen's text.
* Outputs, gradients and memory formats of torch.nn.Conv2d's documented examples and
  arguments: unbatched input, 'same'/'valid', groups, padding modes, channels_last input or
  weight (torch's rule: the output is channels_last when either is), complex and float64
  dtypes (served by the torch backend under "auto"; a forced Triton backend says it cannot),
  zero input channels, an empty batch.
* The fused modules and AddReLU against their torch.nn compositions on empty inputs (no
  input channels, an empty batch), in training and eval mode: outputs, gradients, running
  statistics.
* float64 gradcheck and gradgradcheck of every module, default-initialised, train and eval,
  on the torch backend.
"""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resconv.functional as RF
import resconv.nn as rnn
from resconv import tolerances as T
from resconv._conv_args import conv_memory_format
from conftest import set_backend, test_device
from test_bad_inputs import BAD_CALLS, _tensors

BACKENDS = ["torch", "triton"]
CL = torch.channels_last

# ATen's oneDNN (MKLDNN) conv path appends this to the dtype check every other path words
# alone ("Input type (X) and weight type (Y) should be the same"): resconv quotes the latter.
MKLDNN_SUFFIX = re.compile(r" or input should be a MKLDNN tensor and \w+ is a dense tensor")


def _device(backend: str) -> str:
    return test_device() if backend == "triton" else "cpu"


def _raised(fn) -> BaseException:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about zero-element initialisation
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the exception is what is compared
            return e
    raise AssertionError("the call did not raise")


# ------------------------------------------------------------------------------------------
# errors, side by side
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [b for b in BAD_CALLS if b.torch is not None], ids=lambda b: b.id)
def test_error_is_torchs(bad, backend):
    t = _tensors(_device(backend))
    theirs = _raised(lambda: bad.torch(t))
    ours = _raised(lambda: bad.call(t, backend))
    side = f"torch: {type(theirs).__name__}: {theirs}\nresconv: {type(ours).__name__}: {ours}"
    assert isinstance(ours, type(theirs)), side
    if not bad.why:
        assert MKLDNN_SUFFIX.sub("", str(theirs)) in str(ours), side


# ------------------------------------------------------------------------------------------
# torch.nn.Conv2d's documented behaviour
# ------------------------------------------------------------------------------------------
@dataclass
class Doc:
    """One nn.Conv2d construction and input (shape, dtype, layouts of input and weight)."""

    id: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    shape: tuple = (2, 4, 6, 5)
    dtype: torch.dtype = torch.float32
    x_cl: bool = False
    w_cl: bool = False
    bias_value: Optional[float] = None


DOC_CASES = [
    # torch.nn.Conv2d's docstring examples, on smaller inputs (the Triton interpreter is slow)
    Doc("doc_square_stride2", (16, 33, 3), dict(stride=2), (2, 16, 9, 10)),
    Doc("doc_rect_stride_padding", (16, 33, (3, 5)), dict(stride=(2, 1), padding=(4, 2)), (2, 16, 7, 9)),
    Doc("doc_rect_dilation", (16, 33, (3, 5)), dict(stride=(2, 1), padding=(4, 2), dilation=(3, 1)), (2, 16, 7, 9)),
    # the arguments and inputs its documentation describes
    Doc("unbatched", (4, 6, 3), dict(padding=1), (4, 5, 6)),
    Doc("same_even_kernel_dilated", (4, 6, (4, 3)), dict(padding="same", dilation=(1, 2)), (2, 4, 7, 8)),
    Doc("valid", (4, 6, 3), dict(padding="valid")),
    Doc("groups", (4, 6, 3), dict(groups=2, padding=1)),
    Doc("depthwise", (4, 8, 3), dict(groups=4)),
    Doc("no_bias", (4, 6, 3), dict(bias=False, padding=1)),
    Doc("reflect_channels_last", (4, 6, 3), dict(padding=1, padding_mode="reflect"), x_cl=True),
    Doc("circular_channels_last", (4, 6, 3), dict(padding=1, padding_mode="circular"), x_cl=True),
    # memory formats: channels_last when input or weight is (issue 13, point 4)
    Doc("input_channels_last", (4, 6, 3), dict(padding=1), x_cl=True),
    Doc("weight_channels_last", (4, 6, 3), dict(padding=1), w_cl=True),
    Doc("weight_channels_last_unbatched", (4, 6, 3), dict(padding=1), (4, 5, 6), w_cl=True),
    Doc("both_channels_last_1x1_output", (4, 6, (6, 5)), {}, x_cl=True, w_cl=True),
    # zero sizes (point 3): no input channels gives no output channels; an empty batch
    Doc("no_input_channels", (0, 33, 3), dict(stride=2), (2, 0, 50, 100)),
    Doc("no_input_channels_no_bias", (0, 6, 3), dict(bias=False), (2, 0, 5, 5)),
    Doc("empty_batch", (4, 6, 3), {}, (0, 4, 5, 5)),
    Doc("empty_batch_channels_last_weight", (4, 6, 3), {}, (0, 4, 5, 5), w_cl=True),
    Doc("empty_batch_empty_spatial", (4, 6, 3), dict(padding=2), (0, 4, 0, 5)),
    Doc("no_input_channels_empty_spatial", (0, 6, 1), dict(padding=1), (2, 0, 0, 3)),
    # dtypes the kernels do not serve (points 2 and 5)
    Doc("complex64", (4, 6, 3), dict(padding=1), dtype=torch.complex64),
    Doc("complex128_channels_last", (4, 6, 3), {}, dtype=torch.complex128, x_cl=True),
    Doc("float64", (4, 6, 3), dict(padding=1), dtype=torch.float64),
    Doc("float64_large_bias", (4, 6, 3), {}, dtype=torch.float64, bias_value=12345.678901234),
    Doc("float64_weight_channels_last", (4, 6, 3), {}, dtype=torch.float64, w_cl=True),
]


def _pair_of_modules(case: Doc, backend: str):
    """(torch.nn.Conv2d, resconv.nn.Conv2d) with the same parameters, on the backend's device."""
    dev = _device(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element initialisation
        ref = nn.Conv2d(*case.args, **case.kwargs, dtype=case.dtype)
        ours = rnn.Conv2d(*case.args, **case.kwargs, dtype=case.dtype)
    if case.bias_value is not None:
        with torch.no_grad():
            ref.bias.fill_(case.bias_value)
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.to(dev), set_backend(ours.to(dev), backend)
    if case.w_cl:
        ref, ours = ref.to(memory_format=CL), ours.to(memory_format=CL)
    return ref, ours


def _input(case: Doc, backend: str) -> torch.Tensor:
    x = torch.randn(case.shape, dtype=case.dtype, device=_device(backend))
    return x.contiguous(memory_format=CL) if case.x_cl else x


def _serve_or_fall_back(ours, backend: str, x: torch.Tensor):
    """A dtype the backend cannot serve: forcing it raises BackendUnavailableError naming
    the dtype; "auto" (backend None) then serves the call with the torch backend."""
    if RF.unavailable_reason(backend, x.device, x.dtype) is None:
        return
    with pytest.raises(RF.BackendUnavailableError, match=re.escape(str(x.dtype))):
        ours(x)
    set_backend(ours, None)


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, grad: bool = False):
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != torch's {ref.dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != torch's {tuple(ref.shape)}"
    assert out.stride() == ref.stride(), f"{name}: strides {out.stride()} != torch's {ref.stride()} (memory format)"
    tf32 = ref.is_cuda and torch.backends.cudnn.allow_tf32  # torch's conv and ours alike (allow_tf32=None)
    cmp = T.compare(out, ref, T.tolerance(ref.dtype, tf32=tf32, grad=grad))
    assert cmp.ok, f"{name}: {cmp}"


def _backward(out: torch.Tensor, ref: torch.Tensor):
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DOC_CASES, ids=lambda c: c.id)
def test_conv2d_module_is_torchs(case, backend):
    ref, ours = _pair_of_modules(case, backend)
    x = _input(case, backend)
    _serve_or_fall_back(ours, backend, x)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, exp = ours(xo), ref(xr)
    _check("output", out, exp)
    _backward(out, exp)
    _check("input grad", xo.grad, xr.grad, grad=True)
    _check("weight grad", ours.weight.grad, ref.weight.grad, grad=True)
    if ref.bias is not None:
        _check("bias grad", ours.bias.grad, ref.bias.grad, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in DOC_CASES if c.kwargs.get("padding_mode", "zeros") == "zeros"],
                         ids=lambda c: c.id)
def test_functional_conv2d_is_torchs(case, backend):
    ref, _ = _pair_of_modules(case, backend)
    x = _input(case, backend)
    be = backend if RF.unavailable_reason(backend, x.device, x.dtype) is None else None
    operands = [x, ref.weight.detach()] + ([] if ref.bias is None else [ref.bias.detach()])
    ours = [t.clone().requires_grad_() for t in operands]
    theirs = [t.clone().requires_grad_() for t in operands]
    bias = (lambda ts: ts[2] if len(ts) == 3 else None)  # noqa: E731
    args = (ref.stride, ref.padding, ref.dilation, ref.groups)
    out = RF.conv2d(ours[0], ours[1], bias(ours), *args, backend=be)
    exp = F.conv2d(theirs[0], theirs[1], bias(theirs), *args)
    _check("output", out, exp)
    _backward(out, exp)
    for name, o, r in zip(("input", "weight", "bias"), ours, theirs):
        _check(f"{name} grad", o.grad, r.grad, grad=True)


def test_memory_format_rule_is_torchs():
    """conv_memory_format predicts the strides of F.conv2d's output on this machine's CPU, for
    dense, sliced and permuted layouts of input and weight, ambiguous ones (C == 1, 1x1
    spatial) and every floating dtype."""
    def layouts(shape):
        n, c, h, w = shape
        t = torch.randn(shape)
        yield from (t, t.contiguous(memory_format=CL), torch.randn(n, 2 * c, h, w)[:, ::2],
                    torch.randn(n, 2 * c, h, w).contiguous(memory_format=CL)[:, :c],
                    torch.randn(n, c, w, h).transpose(2, 3), torch.randn(w, h, c, n).permute(3, 2, 1, 0))

    for (N, C, H, W, K, R) in [(2, 3, 5, 5, 4, 3), (2, 1, 5, 5, 4, 3), (1, 4, 1, 1, 4, 1), (2, 4, 5, 5, 1, 3),
                               (0, 3, 4, 4, 2, 1), (2, 0, 4, 4, 2, 1)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.complex64):
            for x in layouts((N, C, H, W)):
                for w in layouts((K, C, R, R)):
                    x_, w_ = x.to(dtype), w.to(dtype)
                    out = F.conv2d(x_, w_)
                    fmt = conv_memory_format(x_, w_)
                    same = out.stride() == torch.empty(out.shape, memory_format=fmt).stride()
                    if dtype.is_complex:  # made by elementwise ops on real convs (Gauss's trick), which
                        same = same or out.is_contiguous(memory_format=fmt)  # stride size-1 dims their way
                    assert same, f"{dtype} x{tuple(x.shape)}{x.stride()} w{tuple(w.shape)}{w.stride()}: torch " \
                                 f"gives {out.stride()}, the rule {fmt}"



def test_channels_last_shortcut_agrees_with_torchs_rule():
    """The contiguity-flag shortcut in conv_memory_format answers as torch's stride rule on
    every 4-D layout: permutations of sizes 0, 1, 2, 3, 5, dense in either format or sliced."""
    import itertools
    import random

    from torch._prims_common import suggest_memory_format
    from resconv._conv_args import _suggests_channels_last

    rng = random.Random(0)
    for shape in itertools.product((0, 1, 2, 3, 5), repeat=4):
        for perm in rng.sample(list(itertools.permutations(range(4))), 6):
            t = torch.empty([shape[i] for i in perm]).permute(*[perm.index(i) for i in range(4)])
            for u in (t, t.contiguous(), t.contiguous(memory_format=CL), t[:, :, ::2], t[..., 1:]):
                assert _suggests_channels_last(u) == (suggest_memory_format(u) == CL), (u.shape, u.stride())

# ------------------------------------------------------------------------------------------
# fused modules and AddReLU on empty inputs, against their torch.nn compositions
# ------------------------------------------------------------------------------------------
FUSED = [rnn.ConvBn2d, rnn.ConvBnReLU2d, rnn.ConvBnAddReLU2d]


def _torch_fused(m: rnn._ConvBnNd, x, residual):
    conv, bn = m.to_modules()
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if m._relu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 0, 6, 6), (0, 4, 6, 6)], ids=["no_input_channels", "empty_batch"])
@pytest.mark.parametrize("cls", FUSED, ids=lambda c: c.__name__)
def test_fused_module_on_empty_input_is_torchs(cls, shape, train, backend):
    dev = _device(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = set_backend(cls(shape[1], 5, 3, bias=True).to(dev), backend).train(train)
    with torch.no_grad():
        ours.bn.weight.uniform_(0.5, 1.5), ours.bn.bias.uniform_(-0.5, 0.5)
        ours.bn.running_mean.uniform_(-0.5, 0.5), ours.bn.running_var.uniform_(0.5, 2.0)
    ref = cls.from_modules(*[copy.deepcopy(m) for m in ours.to_modules()])
    x = torch.randn(shape, device=dev)
    out_shape = (shape[0], 0 if shape[1] == 0 else 5, 4, 4)
    res = torch.randn(out_shape, device=dev) if cls is rnn.ConvBnAddReLU2d else None
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ro = None if res is None else res.clone().requires_grad_()
    rr = None if res is None else res.clone().requires_grad_()
    out = ours(xo, ro) if res is not None else ours(xo)
    exp = _torch_fused(ref, xr, rr)
    _check("output", out, exp)
    _backward(out, exp)
    _check("input grad", xo.grad, xr.grad, grad=True)
    if res is not None:
        _check("residual grad", ro.grad, rr.grad, grad=True)
    for name in ("weight", "bias", "bn.weight", "bn.bias"):
        o, r = ours.get_parameter(name).grad, ref.get_parameter(name).grad
        assert (o is None) == (r is None), f"{name} grad: {o} vs torch's {r}"
        if r is not None:
            _check(f"{name} grad", o, r, grad=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours.bn, name), getattr(ref.bn, name)), f"bn.{name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (0,)])
def test_add_relu_on_empty_input_is_torchs(shape, backend):
    dev = _device(backend)
    a, b = (torch.randn(shape, device=dev).requires_grad_() for _ in range(2))
    ar, br = (t.detach().clone().requires_grad_() for t in (a, b))
    out = set_backend(rnn.AddReLU(), backend)(a, b)
    exp = torch.relu(ar + br)
    _check("output", out, exp)
    _backward(out, exp)
    _check("input grad", a.grad, ar.grad, grad=True)
    _check("residual grad", b.grad, br.grad, grad=True)


# ------------------------------------------------------------------------------------------
# float64 gradcheck / gradgradcheck of every module (torch backend, default initialisation)
# ------------------------------------------------------------------------------------------
GRADCHECK_MODULES = {
    "Conv2d": lambda: rnn.Conv2d(2, 3, 3, padding=1),
    "Conv2d_strided_groups": lambda: rnn.Conv2d(4, 2, (3, 2), stride=(2, 1), groups=2, dilation=(1, 2)),
    "ConvBn2d": lambda: rnn.ConvBn2d(2, 3, 3, padding=1, bias=True),
    "ConvBnReLU2d": lambda: rnn.ConvBnReLU2d(2, 3, 3, padding=1),
    "ConvBnAddReLU2d": lambda: rnn.ConvBnAddReLU2d(2, 3, 3, padding=1, bias=True),
    "AddReLU": lambda: rnn.AddReLU(),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(GRADCHECK_MODULES))
def test_gradcheck_float64(name, train):
    m = set_backend(GRADCHECK_MODULES[name]().double(), "torch")
    C, K = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (3, 3)
    inputs = [torch.randn(2, C, 5, 4, dtype=torch.float64)]
    if name in ("ConvBnAddReLU2d", "AddReLU"):
        inputs.append(torch.randn(2, K, 5, 4, dtype=torch.float64))
    if isinstance(m, rnn._ConvBnNd):
        with torch.no_grad():  # running statistics of a training step, not the initial 0 and 1
            m.train()(*inputs)
    m.train(train)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]
    inputs = [t.requires_grad_() for t in inputs]

    def f(*args):
        return torch.func.functional_call(m, dict(zip(names, args[len(inputs):])), tuple(args[: len(inputs)]))

    assert torch.autograd.gradcheck(f, (*inputs, *params))
    # second order on a random projection (its full Jacobian is too slow to form here)
    assert torch.autograd.gradgradcheck(f, (*inputs, *params), fast_mode=True)
