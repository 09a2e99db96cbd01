"""What a network's layers do to their input: output shapes, parameters, MACs, receptive fields.

* :func:`conv_output_size`: the output side of a convolution or pooling window,
  ``floor((H + 2p - d(k - 1) - 1) / s) + 1`` (torch.nn.Conv2d's documentation).
* :func:`receptive_field`: the input region that one output unit of a module sees, computed
  analytically or measured (the input gradient of the centre unit).
* :func:`summary`: a per-module table (output shape, parameters, MACs, receptive field and
  jump) for any ``nn.Module`` and input size.

The analytic receptive field follows the recurrence of Araujo, Norris and Sim, "Computing
Receptive Fields of Convolutional Neural Networks", Distill 2019: a layer with kernel k,
stride s, padding p and dilation d maps a unit's input interval ``[lo, hi]`` (in input
pixels, ``jump`` pixels between neighbouring units) to

    RF_l = RF_{l-1} + d (k - 1) * jump_{l-1},   jump_l = jump_{l-1} * s,
    lo_l = lo_{l-1} - p * jump_{l-1}

It is propagated through every tensor operation of one forward pass on the ``meta`` device
(no memory, no compute), so branches and skip connections are followed: an elementwise
operation's output sees the union of its inputs' regions; a global pooling or a linear
layer sees everything its input saw. Max-pooling and average-pooling windows count like
convolution kernels; every padding mode counts like zero padding (circular padding's wrapped
pixels are not followed).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from ._conv_args import _int_list, resolve_padding

IntOrPair = Union[int, Sequence[int]]
aten = torch.ops.aten


# ----------------------------------------------------------------------------------------
# output size
# ----------------------------------------------------------------------------------------

def _pair(value, name: str) -> tuple[int, int]:
    """An int or a sequence of one or two ints as a pair (TypeError otherwise)."""
    v = _int_list(value, name)
    if len(v) not in (1, 2):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _padding(padding, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]) -> tuple[int, int, int, int]:
    """``padding`` as nn.Conv2d takes it -> (top, bottom, left, right), checked."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if padding == "same" and s != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
        return resolve_padding(padding, k, d)
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding: expected non-negative values, got {padding!r}")
    return (ph, ph, pw, pw)


def conv_output_size(size: IntOrPair, kernel_size: IntOrPair, stride: IntOrPair = 1,
                     padding: Union[str, IntOrPair] = 0, dilation: IntOrPair = 1):
    """Output side of a convolution (or pooling window): ``floor((H + 2p - d(k-1) - 1) / s) + 1``.

    Args:
        size (int or (H, W)): input height/width in pixels.
        kernel_size, stride, dilation (int or pair); padding (int, pair, 'same' or 'valid'),
            as torch.nn.Conv2d takes them ('same' pads ``d(k-1)`` in total, the odd pixel
            after, and needs stride 1).
    Returns:
        int for an int ``size``, else the pair ``(P, Q)``.
    Raises:
        TypeError: a non-int argument. ValueError: non-positive size, kernel, stride or
        dilation; negative padding; 'same' with stride > 1; a window larger than the padded
        input.
    """
    scalar = isinstance(size, int) and not isinstance(size, bool)
    hw = _pair(size, "size")
    k, s, d = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    for name, v in (("size", hw), ("kernel_size", k), ("stride", s), ("dilation", d)):
        if min(v) < 1:
            raise ValueError(f"{name}: expected positive values, got {v}")
    t, b, l, r = _padding(padding, k, s, d)
    out = []
    for n, lo, hi, kk, ss, dd, name in ((hw[0], t, b, k[0], s[0], d[0], "height"), (hw[1], l, r, k[1], s[1], d[1], "width")):
        span = dd * (kk - 1) + 1
        if n + lo + hi < span:
            raise ValueError(f"kernel_size: the window spans {span} pixels, more than the padded input {name} "
                             f"{n + lo + hi}")
        out.append((n + lo + hi - span) // ss + 1)
    return out[0] if scalar else tuple(out)


# ----------------------------------------------------------------------------------------
# analytic receptive field: geometry carried by every tensor of a meta forward pass
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geo:
    """Where the units of a [N, C, H, W] tensor look in the input, per axis (rows, columns):
    unit i covers input pixels ``[lo + i * jump, hi + i * jump]``. ``spatial`` False: a
    tensor without a spatial grid (after global pooling, flatten, linear): lo/hi bound
    everything it saw."""

    jump: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]
    spatial: bool = True

    def window(self, k, s, p, d) -> "_Geo":
        """After a window op: kernel k, stride s, leading padding p, dilation d (pairs)."""
        return _Geo(tuple(j * st for j, st in zip(self.jump, s)),
                    tuple(lo - pp * j for lo, pp, j in zip(self.lo, p, self.jump)),
                    tuple(hi + (dd * (kk - 1) - pp) * j for hi, kk, pp, dd, j in zip(self.hi, k, p, d, self.jump)))

    def flattened(self, size: tuple[int, int]) -> "_Geo":
        """Every unit of a size[0] x size[1] grid, merged (global pooling, flatten)."""
        if not self.spatial:
            return self
        return _Geo(self.jump, self.lo, tuple(h + (n - 1) * j for h, n, j in zip(self.hi, size, self.jump)), False)

    @staticmethod
    def union(geos: list["_Geo"]) -> "_Geo":
        g0 = geos[0]
        return _Geo(g0.jump, tuple(min(g.lo[a] for g in geos) for a in (0, 1)),
                    tuple(max(g.hi[a] for g in geos) for a in (0, 1)), all(g.spatial for g in geos))

    @property
    def size(self) -> tuple[int, int]:
        return (self.hi[0] - self.lo[0] + 1, self.hi[1] - self.lo[1] + 1)


def _ints(v, n=2):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * n if len(v) == 1 else v[:n])


class _GeometryMode(TorchDispatchMode):
    """Carries a _Geo along every tensor that the forward pass computes (by the aten ops it
    runs), and counts multiply-accumulates for the modules being run."""

    def __init__(self, on_macs):
        super().__init__()
        self.geo = WeakIdKeyDictionary()
        self.on_macs = on_macs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor) and a in self.geo]
        if ins:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            geo = self._window_op(func, args, x, out)
            for t in _flat([out]):
                if isinstance(t, torch.Tensor):
                    g = geo if geo is not None else self._pointwise(t, ins)
                    if g is not None:
                        self.geo[t] = g
        self._count(func, args, out)
        return out

    def _window_op(self, func, args, x, out) -> Optional[_Geo]:
        """The geometry after a conv, pooling or padding op (None for other ops)."""
        pkt = func.overloadpacket
        g = self.geo.get(x) if x is not None else None
        if g is None:
            return None
        if pkt is aten.convolution and g.spatial:
            w = args[1]
            return g.window(tuple(w.shape[2:]), _ints(args[3]), _ints(args[4]), _ints(args[5]))
        if pkt in (aten.max_pool2d_with_indices, aten.max_pool2d, aten.avg_pool2d) and g.spatial:
            k = _ints(args[1])
            s = _ints(args[2]) if len(args) > 2 and args[2] else k
            p = _ints(args[3]) if len(args) > 3 else (0, 0)
            d = _ints(args[4]) if pkt is not aten.avg_pool2d and len(args) > 4 else (1, 1)
            return g.window(k, s, p, d)
        if pkt in (aten.constant_pad_nd, aten.reflection_pad2d, aten.replication_pad2d, aten._pad_circular) \
                and g.spatial:
            pad = list(args[1]) + [0, 0, 0, 0]
            left, top = pad[0], pad[2]
            return _Geo(g.jump, (g.lo[0] - top * g.jump[0], g.lo[1] - left * g.jump[1]),
                        (g.hi[0] - top * g.jump[0], g.hi[1] - left * g.jump[1]))
        if pkt in (aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.adaptive_avg_pool2d):
            size = tuple(x.shape[-2:])
            osz = tuple(out[0].shape[-2:] if isinstance(out, (tuple, list)) else out.shape[-2:])
            if osz == (1, 1):
                return g.flattened(size)
            # window i spans [floor(i H / P), ceil((i+1) H / P)): the widest one, at stride floor(H / P)
            k = tuple(max(math.ceil((i + 1) * n / o) - (i * n // o) for i in range(o)) for n, o in zip(size, osz))
            return g.window(k, tuple(max(n // o, 1) for n, o in zip(size, osz)), (0, 0), (1, 1))
        return None

    def _pointwise(self, t: torch.Tensor, ins: list) -> Optional[_Geo]:
        """Any other op's output ``t``: on its inputs' grid (same H, W, jump) it sees the union of
        what they saw (elementwise, channel-wise, normalisation, concatenation); otherwise (mean
        over H and W, flatten, linear, a 1-D statistic) everything they saw."""
        geos = [self.geo[i] for i in ins]
        if t.dim() == 4 and all(i.dim() == 4 and i.shape[-2:] == t.shape[-2:] for i in ins) \
                and all(g.spatial for g in geos) and len({g.jump for g in geos}) == 1:
            return _Geo.union(geos)
        return _Geo.union([self.geo[i].flattened(tuple(i.shape[-2:]) if i.dim() == 4 else (1, 1)) for i in ins])

    def _count(self, func, args, out):
        pkt = func.overloadpacket
        if pkt is aten.convolution:
            w = args[1]
            o = out
            self.on_macs(o.shape[0] * o.shape[2] * o.shape[3] * w.numel())  # N P Q x K (C/groups) R S
        elif pkt in (aten.addmm, aten.mm, aten.bmm):
            a, b = (args[1], args[2]) if pkt is aten.addmm else (args[0], args[1])
            self.on_macs(a.numel() * b.shape[-1])


def _flat(items) -> list:
    out = []
    for a in items:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """One row of :func:`summary`: a module's call in the forward pass."""

    name: str  # module path ('' for the model itself)
    type: str
    depth: int
    output_shape: tuple
    params: int  # Parameters this module computes with (its own and those of modules it holds a reference to)
    macs: int  # multiply-accumulates in this call, all of its children included
    rf: Optional[tuple[int, int]]  # receptive field (rows, columns) of one output unit, input pixels
    jump: Optional[tuple[int, int]]  # input pixels between neighbouring output units

    def as_dict(self) -> dict:
        return dict(name=self.name, type=self.type, depth=self.depth, output_shape=list(self.output_shape),
                    params=self.params, macs=self.macs, rf=list(self.rf) if self.rf else None,
                    jump=list(self.jump) if self.jump else None)


@dataclass
class Summary:
    """The table :func:`summary` returns; ``str()`` renders it."""

    input_size: tuple
    layers: list = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    total_macs: int = 0

    def __getitem__(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        head = ("layer", "type", "output shape", "params", "MACs", "RF", "jump")
        rows = [head]
        for r in self.layers:
            rows.append(("  " * max(r.depth - 1, 0) + (r.name or "<model>"), r.type,
                         "x".join(str(s) for s in r.output_shape), f"{r.params:,}", f"{r.macs:,}",
                         "x".join(map(str, r.rf)) if r.rf else "-", "x".join(map(str, r.jump)) if r.jump else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines += ["-" * len(lines[0]),
                  f"input {'x'.join(map(str, self.input_size))}: {self.total_params:,} parameters "
                  f"({self.trainable_params:,} trainable), {self.total_macs:,} MACs "
                  f"({self.total_macs / 1e9:.3f} G) per forward pass"]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dict(input_size=list(self.input_size), total_params=self.total_params,
                    trainable_params=self.trainable_params, total_macs=self.total_macs,
                    layers=[r.as_dict() for r in self.layers])


def _full_size(input_size) -> tuple:
    size = tuple(input_size)
    if len(size) == 3:
        size = (1,) + size
    if len(size) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"input_size: expected (C, H, W) or (N, C, H, W) positive ints, got {input_size!r}")
    return size


def _module_params(m: nn.Module) -> set:
    """Parameters a module computes with: its own subtree's, plus those of a BatchNorm that a
    fused conv holds by reference (``bn`` not registered as its child, see resconv.nn)."""
    ps = {id(p) for p in m.parameters()}
    bn = m.__dict__.get("bn")
    if isinstance(bn, nn.Module):
        ps |= {id(p) for p in bn.parameters()}
    return ps


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device in eval mode (the model itself is not touched)."""
    return copy.deepcopy(model).to("meta").eval()


def _trace(model: nn.Module, size: tuple, max_depth: Optional[int], layer: Optional[str] = None):
    """Run ``model`` (a meta copy) once under _GeometryMode. Returns (rows in call order, the
    geometry of the output of ``layer``'s last call, or of the model's output)."""
    sizes = {id(p): p.numel() for p in model.parameters()}
    stack: list[list] = []  # [row index, MACs so far] of the modules being run
    rows: list[Optional[LayerInfo]] = []
    target: list = []
    mode = _GeometryMode(lambda n: [entry.__setitem__(1, entry[1] + n) for entry in stack])

    def pre(name, depth):
        def hook(mod, args):
            stack.append([len(rows), 0])
            rows.append(None)  # filled when the call returns: rows stay in call order
        return hook

    def post(name, depth):
        def hook(mod, args, out):
            index, macs = stack.pop()
            t = out[0] if isinstance(out, (tuple, list)) else out
            g = mode.geo.get(t) if isinstance(t, torch.Tensor) else None
            if name == layer:
                target.append(g)
            rows[index] = LayerInfo(
                name, type(mod).__name__, depth, tuple(t.shape) if isinstance(t, torch.Tensor) else (),
                sum(sizes[i] for i in _module_params(mod) if i in sizes), macs,
                g.size if g is not None else None, g.jump if g is not None and g.spatial else None)
        return hook

    handles = []
    for name, m in model.named_modules():
        depth = 0 if not name else name.count(".") + 1
        handles.append(m.register_forward_pre_hook(pre(name, depth)))
        handles.append(m.register_forward_hook(post(name, depth)))
    x = torch.empty(size, device="meta")
    try:
        with torch.no_grad(), mode:
            mode.geo[x] = _Geo((1, 1), (0, 0), (0, 0))
            out = model(x)
            geo = mode.geo.get(out) if isinstance(out, torch.Tensor) else None
    finally:
        for h in handles:
            h.remove()
    if layer is not None:
        geo = target[-1] if target else None
    return [r for r in rows if max_depth is None or r.depth <= max_depth], geo


def summary(model: nn.Module, input_size: Sequence[int], *, depth: Optional[int] = 3) -> Summary:
    """Per-module table of ``model`` on an input of ``input_size``: output shape, parameters,
    MACs, receptive field and jump (see the module docstring).

    Runs a copy of the model on the ``meta`` device in eval mode (nothing is computed, the
    model is left as it is).

    Args:
        model (nn.Module): any model taking one Tensor[N, C, H, W].
        input_size ((C, H, W) or (N, C, H, W)): N defaults to 1; MACs are for the whole batch.
        depth (int or None): rows for modules at most this deep (1: the model's children);
            None: every module.
    Returns:
        :class:`Summary` (``str()`` for the table, ``as_dict()`` for JSON); totals count every
        Parameter once.
    Raises:
        ValueError: a malformed ``input_size``.
    """
    size = _full_size(input_size)
    meta = _meta_copy(model)
    rows, _ = _trace(meta, size, depth)
    params = list({id(p): p for p in model.parameters()}.values())
    total_macs = next((r.macs for r in rows if r.name == ""), 0)
    shown = [r for r in rows if r.name != ""] or rows  # a model without children: its own row
    return Summary(size, shown, sum(p.numel() for p in params),
                   sum(p.numel() for p in params if p.requires_grad), total_macs)


# ----------------------------------------------------------------------------------------
# receptive field
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of a module's output units.

    size: (rows, columns) of input pixels one unit sees, padding included (analytic), or
        the extent measured inside the image (empirical: clipped at the image's border).
    jump: input pixels between neighbouring output units (None when measured, or when the
        output has no spatial grid).
    centre: ((top, bottom), (left, right)) inclusive input rows/columns that the centre
        unit (index (P-1)//2, (Q-1)//2) sees inside the image: comparable between methods.
    """

    size: tuple[int, int]
    jump: Optional[tuple[int, int]]
    centre: tuple[tuple[int, int], tuple[int, int]]


def receptive_field(model: nn.Module, input_size: Sequence[int], *, layer: Optional[str] = None,
                    method: str = "analytic", device="cpu", backend: Optional[str] = "torch") -> ReceptiveField:
    """The receptive field of the output of ``model`` (or of its submodule ``layer``).

    Args:
        model (nn.Module): takes one Tensor[N, C, H, W].
        input_size ((C, H, W) or (N, C, H, W)).
        layer (str or None): a module name as in ``model.named_modules()`` (e.g. 'layer3');
            None: the model's output.
        method ('analytic' or 'empirical'): 'analytic' follows the recurrence of the module
            docstring through a meta forward pass. 'empirical' measures it: a copy of the
            model with every conv weight set to 1 / fan_in and bias to 0, BatchNorm to
            the identity (eval mode, statistics 0 and 1) and max-pooling replaced by average
            pooling of the same window (so that every path carries gradient), run on an input
            of ones; the input pixels with a non-zero gradient of the centre unit's channel
            sum are its receptive field inside the image.
        device, backend: where the empirical copy runs and which resconv backend computes
            it (None: auto); float64 with the 'torch' backend, float32 with the others.
    Returns:
        :class:`ReceptiveField`.
    Raises:
        ValueError: an unknown method or layer, a malformed input_size, a layer output
            without a spatial grid for 'empirical'.
    """
    if method not in ("analytic", "empirical"):
        raise ValueError(f"method: expected 'analytic' or 'empirical', got {method!r}")
    size = _full_size(input_size)
    names = dict(model.named_modules())
    if layer is not None and layer not in names:
        raise ValueError(f"layer: {layer!r} is not a module of the model")
    if method == "empirical":
        return _empirical(model, size, layer, torch.device(device), backend)
    rows, geo = _trace(_meta_copy(model), size, None, layer)
    if geo is None:
        raise ValueError(f"layer: the output of {layer or 'the model'} is not a tensor computed from the input"
                         + (" (or the module is never called)" if layer else ""))
    shape = next(r.output_shape for r in reversed(rows) if r.name == (layer or ""))
    return _report(geo, shape, size)


def _report(geo: _Geo, shape, size: tuple) -> ReceptiveField:
    H, W = size[2], size[3]
    if geo.spatial and shape is not None and len(shape) == 4:
        ci, cj = (shape[2] - 1) // 2, (shape[3] - 1) // 2
        rows = (geo.lo[0] + ci * geo.jump[0], geo.hi[0] + ci * geo.jump[0])
        cols = (geo.lo[1] + cj * geo.jump[1], geo.hi[1] + cj * geo.jump[1])
    else:
        rows, cols = (geo.lo[0], geo.hi[0]), (geo.lo[1], geo.hi[1])
    clip = lambda r, n: (max(r[0], 0), min(r[1], n - 1))  # noqa: E731
    return ReceptiveField(geo.size, geo.jump if geo.spatial else None, (clip(rows, H), clip(cols, W)))


class _Reached(Exception):
    """Ends a probe's forward pass at the layer being measured."""


def _empirical(model: nn.Module, size: tuple, layer: Optional[str], device: torch.device,
               backend: Optional[str]) -> ReceptiveField:
    dtype = torch.float64 if backend == "torch" else torch.float32
    probe = copy.deepcopy(model).to(device, dtype).eval()
    with torch.no_grad():
        for name, m in list(probe.named_modules()):
            if hasattr(m, "backend"):
                m.backend = backend
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()  # weight 1, bias 0, running mean 0, variance 1
                m.eps = 0.0
            for cname, c in list(m.named_children()):
                if isinstance(c, nn.MaxPool2d):
                    if c.dilation not in (1, (1, 1)):
                        raise ValueError(f"{name}.{cname}: a dilated max-pool has no average-pool twin to measure")
                    setattr(m, cname, nn.AvgPool2d(c.kernel_size, c.stride, c.padding, c.ceil_mode))
    x = torch.ones(size[1:], dtype=dtype, device=device).unsqueeze(0).requires_grad_()
    found: list = []
    target = probe if layer is None else dict(probe.named_modules())[layer]

    def stop(m, a, o):  # the layer's output is all we need: skip the rest of the forward pass
        found.append(o[0] if isinstance(o, (tuple, list)) else o)
        raise _Reached

    h = target.register_forward_hook(stop)
    try:
        probe(x)
    except _Reached:
        pass
    finally:
        h.remove()
    out = found[0]
    if out.dim() != 4:
        raise ValueError(f"layer: the output of {layer or 'the model'} has no spatial grid (shape {tuple(out.shape)})")
    P, Q = out.shape[2:]
    out[0, :, (P - 1) // 2, (Q - 1) // 2].sum().backward()
    seen = (x.grad[0].abs().sum(0) > 0).cpu()
    rows = torch.nonzero(seen.any(1)).flatten()
    cols = torch.nonzero(seen.any(0)).flatten()
    centre = ((int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max())))
    return ReceptiveField((centre[0][1] - centre[0][0] + 1, centre[1][1] - centre[1][0] + 1), None, centre)
