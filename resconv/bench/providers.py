"""Providers: the implementations a layer case is measured with, side by side.

Each provider builds, for every input set, a forward thunk and the tensors to differentiate;
:meth:`Provider.prepare` turns those into ``call(i) -> (out, grads or None)`` for the case's
mode (see :mod:`resconv.bench.cases`). The runner times ``call``; it never knows which
provider it is.

=========================  ==================================================================
``eager``                  torch.nn.Conv2d + BatchNorm2d (+ ``+=`` residual) + ReLU(inplace),
                           as torchvision's BasicBlock; cuDNN with ``cudnn.benchmark=True``
``bare-conv``              the convolution alone (``F.conv2d``: cuDNN's on a GPU), the yardstick
``cudnn-fused``            ``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``
                           on BN-folded filters (inference; layers with a ReLU; CUDA)
``compile``                ``torch.compile`` of the same conv/BN/add/ReLU (default mode)
``compile-max-autotune``   ``torch.compile(mode="max-autotune")``
``resconv-<backend>``      resconv's fused modules with ``backend`` torch / triton / cuda
``<provider>-graph``       the provider's eval forward captured in CUDA graphs (one per set)
=========================  ==================================================================
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import resconv.reference as R
from ..nn import ConvBn2d, ConvBnAddReLU2d, ConvBnReLU2d
from ..functional import unavailable_reason
from .cases import EPS, MODES, MOMENTUM, LayerCase, LayerSet, grad_names

Thunk = Callable[[], torch.Tensor]


class Provider:
    """Base: subclasses set ``name`` and implement :meth:`build` (and maybe :meth:`_why_not`)."""

    name = "?"
    function = "fused"  # what it computes: 'fused' or 'conv' (see resconv.bench.cases)
    modes: tuple = MODES
    cuda_only = False
    min_budget_s = 0.0  # not started with less time budget left than this (compilation)

    def unavailable(self, case: LayerCase, device: torch.device) -> Optional[str]:
        """None when this provider can run ``case`` on ``device``, else why not."""
        if case.mode not in self.modes:
            return f"not applicable in mode {case.mode}"
        if self.cuda_only and device.type != "cuda":
            return "needs a CUDA GPU"
        return self._why_not(case, device)

    def _why_not(self, case: LayerCase, device: torch.device) -> Optional[str]:
        return None

    def build(self, case: LayerCase, s: LayerSet) -> tuple[Thunk, list]:
        """(forward thunk on set ``s``, the tensors to differentiate in ``grad_names`` order)."""
        raise NotImplementedError

    def prepare(self, case: LayerCase, sets: list[LayerSet]) -> Callable[[int], tuple]:
        """``call(i) -> (out, grads or None)`` for every set index ``i``. Runs in the mode's
        grad context (inference mode for eval); a train-bwd case runs its forwards here."""
        return mode_call(case, sets, [self.build(case, s) for s in sets])


def mode_call(case: LayerCase, sets: list[LayerSet], built: list) -> Callable[[int], tuple]:
    """The timed call for the case's mode, from each set's (forward thunk, tensors to differentiate)."""
    fwds = [b[0] for b in built]
    wrt = [b[1] for b in built]
    if case.mode in ("eval", "train-fwd"):
        return lambda i: (fwds[i](), None)
    if case.mode == "train-fwdbwd":

        def call(i):
            out = fwds[i]()
            return out, torch.autograd.grad(out, wrt[i], sets[i].gout)

        return call
    outs = [f() for f in fwds]  # train-bwd: forward once, backward replayed

    def call_bwd(i):
        return outs[i], torch.autograd.grad(outs[i], wrt[i], sets[i].gout, retain_graph=True)

    return call_bwd


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A new leaf sharing ``t``'s storage (each provider differentiates its own tensors)."""
    return t.detach().requires_grad_(requires_grad)


def torch_modules(case: LayerCase, s: LayerSet) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """torch.nn.Conv2d and BatchNorm2d holding set ``s``'s filters and BN parameters (shared
    storage) and a copy of its running statistics, in the case's train/eval mode."""
    L, train = case.layer, case.train
    conv = nn.Conv2d(L.C, L.K, (L.R, L.S), L.stride, L.padding, bias=False, device="meta")
    conv.weight = nn.Parameter(s.w.detach(), requires_grad=train)
    bn = nn.BatchNorm2d(L.K, eps=EPS, momentum=MOMENTUM, device="meta")
    bn.weight = nn.Parameter(s.gamma.detach(), requires_grad=train)
    bn.bias = nn.Parameter(s.beta.detach(), requires_grad=train)
    bn.running_mean = s.rmean.clone()
    bn.running_var = s.rvar.clone()
    bn.num_batches_tracked = torch.zeros((), dtype=torch.long, device=s.rmean.device)
    conv.train(train)
    bn.train(train)
    return conv, bn


def _wrt(case: LayerCase, s: LayerSet, weight, gamma=None, beta=None) -> list:
    """The tensors to differentiate, in grad_names order."""
    pick = {"x": s.x, "weight": weight, "bn_weight": gamma, "bn_bias": beta, "residual": s.res}
    function = "fused" if gamma is not None else "conv"
    return [pick[n] for n in grad_names(case, function)]


class EagerBlock(nn.Module):
    """conv -> bn (-> ``+= residual``) (-> ReLU(inplace)), as torchvision's BasicBlock runs them."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if residual is not None:
            y += residual
        return self.relu(y) if self.relu is not None else y


class EagerProvider(Provider):
    name = "eager"

    def build(self, case, s):
        conv, bn = torch_modules(case, s)
        block = EagerBlock(conv, bn, case.layer.relu)
        return (lambda: block(s.x, s.res)), _wrt(case, s, conv.weight, bn.weight, bn.bias)


class BareConvProvider(Provider):
    name = "bare-conv"
    function = "conv"

    def build(self, case, s):
        L = case.layer
        w = _leaf(s.w, case.train)
        return (lambda: F.conv2d(s.x, w, None, L.stride, L.padding)), _wrt(case, s, w)


class CudnnFusedProvider(Provider):
    """cuDNN's fused inference ops on filters with eval BatchNorm folded in:
    ``relu(conv(x, W * scale) + shift [+ residual])``."""

    name = "cudnn-fused"
    modes = ("eval",)
    cuda_only = True

    def _why_not(self, case, device):
        if not case.layer.relu:
            return "no ReLU in this layer: cuDNN's fused ops always apply one"
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
        return None

    def build(self, case, s):
        L = case.layer
        scale, shift = R.bn_fold(None, s.gamma, s.beta, s.rmean, s.rvar, EPS)
        wf = (s.w.float() * scale.view(-1, 1, 1, 1)).to(s.w.dtype).contiguous(memory_format=case.memory_format)
        b = shift.to(s.w.dtype)
        stride, pad = list(L.stride), list(L.padding)
        if s.res is not None:
            return (lambda: torch.cudnn_convolution_add_relu(s.x, wf, s.res, 1.0, b, stride, pad, [1, 1], 1)), []
        return (lambda: torch.cudnn_convolution_relu(s.x, wf, b, stride, pad, [1, 1], 1)), []


def fused_functional(x, w, gamma, beta, rmean, rvar, res, *, stride, padding, training: bool, relu: bool):
    """conv -> batch_norm (-> + residual) (-> relu) in torch.nn.functional (what torch.compile gets)."""
    y = F.conv2d(x, w, None, stride, padding)
    y = F.batch_norm(y, rmean, rvar, gamma, beta, training, MOMENTUM, EPS)
    if res is not None:
        y = y + res
    return F.relu(y) if relu else y


class CompileProvider(Provider):
    """torch.compile of :func:`fused_functional`: one compiled graph serves every input set
    (they differ only in data), compiled with ``fullgraph=True`` (a graph break is an error,
    not a silent fallback) and static shapes."""

    def __init__(self, mode: str = "default"):
        self.mode = mode
        self.name = "compile" if mode == "default" else f"compile-{mode}"
        # A retained-graph backward is refused by compiled autograd functions that donate
        # their saved buffers; the suite does not time the compiled backward alone.
        self.modes = ("eval", "train-fwd", "train-fwdbwd")
        self.min_budget_s = 20.0 if mode == "default" else 90.0

    def compiled(self, case: LayerCase):
        """A fresh compiled ``f(x, w, gamma, beta, rmean, rvar, res)`` for the case's layer."""
        import torch._dynamo as dynamo

        dynamo.reset()  # each case compiles afresh: no cache limit reached across cases
        L = case.layer

        def f(x, w, gamma, beta, rmean, rvar, res):
            return fused_functional(x, w, gamma, beta, rmean, rvar, res, stride=L.stride, padding=L.padding,
                                    training=case.train, relu=L.relu)

        return torch.compile(f, fullgraph=True, dynamic=False, mode=None if self.mode == "default" else self.mode)

    def prepare(self, case, sets):
        fn = self.compiled(case)
        return mode_call(case, sets, [self._bind(fn, case, s) for s in sets])

    def build(self, case, s):
        return self._bind(self.compiled(case), case, s)

    @staticmethod
    def _bind(fn, case, s):
        w, g, b = _leaf(s.w, case.train), _leaf(s.gamma, case.train), _leaf(s.beta, case.train)
        rm, rv = s.rmean.clone(), s.rvar.clone()
        return (lambda: fn(s.x, w, g, b, rm, rv, s.res)), _wrt(case, s, w, g, b)


def resconv_module(case: LayerCase, s: LayerSet, backend: str) -> nn.Module:
    """resconv's fused module for the layer's epilogue, over set ``s``'s tensors."""
    L = case.layer
    conv, bn = torch_modules(case, s)
    cls = ConvBnAddReLU2d if L.residual else (ConvBnReLU2d if L.relu else ConvBn2d)
    m = cls.from_modules(conv, bn)
    m.backend = backend
    return m


def backend_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why resconv's backend ``name`` cannot serve ``device``/``dtype`` (None: it can). Only
    that backend is asked: asking the cuda backend loads (or just-in-time compiles) the
    extension, which a run of the Triton backend must not wait for."""
    return unavailable_reason(name, device, dtype)


class ResconvProvider(Provider):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"resconv-{backend}"

    def _why_not(self, case, device):
        return backend_unavailable(self.backend, device, case.torch_dtype)

    def build(self, case, s):
        m = resconv_module(case, s, self.backend)
        if case.layer.residual:
            fwd = lambda: m(s.x, s.res)  # noqa: E731
        else:
            fwd = lambda: m(s.x)  # noqa: E731
        return fwd, _wrt(case, s, m.weight, m.bn.weight, m.bn.bias)


class GraphProvider(Provider):
    """Another provider's inference forward captured in CUDA graphs, one graph per input set
    (each with its own memory pool), replayed. Warm-up on a side stream first, as the CUDA
    graph documentation asks, so that autotuning and cuDNN's search stay out of the capture."""

    modes = ("eval",)
    cuda_only = True

    def __init__(self, base: Provider):
        self.base = base
        self.name = f"{base.name}-graph"
        self.function = base.function
        self.min_budget_s = base.min_budget_s

    def _why_not(self, case, device):
        return self.base.unavailable(case, device)

    def prepare(self, case, sets):
        return capture_graphs(self.base.prepare(case, sets), len(sets))


def capture_graphs(call: Callable[[int], object], n: int) -> Callable[[int], object]:
    """CUDA graphs of ``call(i)`` for i in range(n); returns ``replay(i)`` giving what the
    captured call returned (its tensors are rewritten by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for i in range(n):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            result = call(i)
        graphs.append((g, result))

    def replay(i):
        g, result = graphs[i]
        g.replay()
        return result

    return replay


def _registry() -> dict:
    eager = EagerProvider()
    triton_, cuda_ = ResconvProvider("triton"), ResconvProvider("cuda")
    provs = [
        eager, BareConvProvider(), CudnnFusedProvider(), CompileProvider("default"),
        CompileProvider("max-autotune"), ResconvProvider("torch"), triton_, cuda_,
        GraphProvider(eager), GraphProvider(triton_), GraphProvider(cuda_),
    ]
    return {p.name: p for p in provs}


PROVIDERS = _registry()
