"""Drop-in modules: hold Parameters and buffers, call :mod:`resconv.functional`.

* :class:`Conv2d` — a ``torch.nn.Conv2d`` (same constructor, parameters, ``state_dict``
  keys, behaviour) whose forward runs resconv's kernels.
* :class:`ConvBn2d`, :class:`ConvBnReLU2d`, :class:`ConvBnAddReLU2d` — a conv with its
  BatchNorm2d (``self.bn``) fused, named and laid out like
  ``torch.ao.nn.intrinsic.qat.ConvBn2d``: the module *is* the conv (keys ``weight``,
  ``bias``) and holds the BatchNorm as ``bn`` (keys ``bn.weight``, ``bn.running_mean``, …).
  In training mode BatchNorm uses batch statistics and updates the running ones exactly as
  ``torch.nn.BatchNorm2d``; in eval mode it is folded into the conv epilogue (the fold is
  cached and recomputed when a parameter or buffer changes).
* :class:`ConvReLU2d` — a conv whose ReLU runs in its epilogue (no BatchNorm), named like
  ``torch.ao.nn.intrinsic.qat.ConvReLU2d``.
* :class:`AddReLU` — ``relu(x + residual)`` for skip connections not fused into a conv.

Which backend runs is chosen per call by resconv.functional (``backend`` attribute of a
module, else ``RESCONV_BACKEND``, else auto).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

import resconv.functional as RF
from ._conv_args import conv_memory_format

Tensor = torch.Tensor


def _cache_key(*tensors: Optional[Tensor]) -> tuple:
    """Identity of tensors' contents: storage, in-place version, dtype, device."""
    return tuple(
        None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors
    )


def _cached(module: nn.Module, slot: str, sources: tuple, make, extra: tuple = ()):
    """``make()`` (run outside autograd), kept in ``module.__dict__[slot]`` until a source
    tensor changes (:func:`_cache_key`) or ``extra`` does. The entry holds the sources'
    storages: while it lives no new tensor can take a source's address and, with a fresh
    version counter, match its key (``weight.data = ...`` twice could do that, and the cache
    would then return the product of filters that are gone)."""
    key = _cache_key(*sources) + extra
    entry = module.__dict__.get(slot)
    if entry is None or entry[0] != key:
        with _outside_autograd():
            value = make()
        entry = (key, tuple(t.untyped_storage() for t in sources if t is not None), value)
        module.__dict__[slot] = entry
    return entry[2]


def _cacheable(*tensors: Optional[Tensor]) -> bool:
    """Cache only what no autograd graph or compiler needs to see being computed."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return not any(t is not None and t.is_inference() for t in tensors)


@contextlib.contextmanager
def _outside_autograd():
    """Where cached tensors are made: without a graph, and as normal tensors even inside
    ``torch.inference_mode`` (an inference tensor could not later be saved for backward,
    e.g. by a frozen model's forward with an input that requires grad)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by resconv (same constructor and ``state_dict``).

    Shapes: input Tensor[N, C, H, W] or Tensor[C, H, W] -> Tensor[N, K, P, Q] (or
    Tensor[K, P, Q]), in the input's dtype and the memory format torch.nn.Conv2d gives
    (channels_last when the input or the weight is). See :func:`resconv.functional.conv2d`
    for dtypes, backends and the errors raised (torch's classes, ATen's text).

    Attributes:
        backend (str or None): force a backend for this module ('triton', 'cuda', 'torch').
        allow_tf32 (bool or None): None follows ``torch.backends.cudnn.allow_tf32``.
    """

    backend: Optional[str] = None
    allow_tf32: Optional[bool] = None
    _CACHES = ("_packed_cache", "_fold_cache", "_scaled_cache")

    def __getstate__(self) -> dict:
        """Pickles and deep copies leave the derived-tensor caches behind (rebuilt on use)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k not in self._CACHES}

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.half()`` ...: the caches (copies of the old tensors, which
        they keep alive) are dropped."""
        for slot in self._CACHES:
            self.__dict__.pop(slot, None)
        return super()._apply(fn, *args, **kwargs)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return RF.conv2d(
            input, self._packed_weight(weight, input), bias, self.stride, self.padding, self.dilation, self.groups,
            padding_mode=self.padding_mode, allow_tf32=self.allow_tf32, backend=self.backend,
        )

    def _packed_weight(self, weight: Tensor, input) -> Tensor:
        """The filters in the kernels' layout (K R S C, channels_last), repacked once and
        cached until the parameter changes. Only where that leaves the output's memory format
        as it is (a channels_last input: torch's rule makes the output channels_last anyway);
        otherwise the kernels repack per call."""
        if weight.is_contiguous(memory_format=torch.channels_last) or not _cacheable(weight):
            return weight
        x = input.unsqueeze(0) if isinstance(input, Tensor) and input.dim() == 3 else input
        if not isinstance(x, Tensor) or x.dim() != 4 or conv_memory_format(x, weight) != torch.channels_last:
            return weight
        return _cached(self, "_packed_cache", (weight,),
                       lambda: weight.detach().contiguous(memory_format=torch.channels_last))


class ConvReLU2d(Conv2d):
    """``relu(conv2d(input, weight) + bias)`` with the ReLU in the conv's epilogue: one op.

    The name and layout of ``torch.ao.nn.intrinsic.qat.ConvReLU2d``: the module *is* the
    conv (``torch.nn.Conv2d``'s constructor, ``bias=True`` by default; keys ``weight``,
    ``bias``). Input Tensor[N, C, H, W] (or [C, H, W]) -> Tensor[N, K, P, Q], in the input's
    dtype and the memory format torch gives; errors as :func:`resconv.functional.conv2d`.
    """

    @classmethod
    def from_modules(cls, conv: nn.Conv2d) -> "ConvReLU2d":
        """A ConvReLU2d sharing (not copying) ``conv``'s Parameters: the conv followed by a ReLU.

        Raises:
            TypeError: ``conv`` is not a torch.nn.Conv2d.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected a torch.nn.Conv2d, got {type(conv).__name__}")
        self = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # meta: no storage
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.backend = getattr(conv, "backend", None)
        self.allow_tf32 = getattr(conv, "allow_tf32", None)
        self.train(conv.training)
        return self

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return RF.conv2d(
            input, self._packed_weight(weight, input), bias, self.stride, self.padding, self.dilation, self.groups,
            padding_mode=self.padding_mode, relu=True, allow_tf32=self.allow_tf32, backend=self.backend,
        )


class _ConvBnNd(Conv2d):
    _relu = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, register_bn: bool = True):
        """A fused module over existing ``conv`` and ``bn``, sharing (not copying) their
        Parameters and buffers: training the fused module trains them.

        Args:
            conv (torch.nn.Conv2d): any Conv2d (resconv's or torch's).
            bn (torch.nn.BatchNorm2d): with ``bn.num_features == conv.out_channels``
                (nn.SyncBatchNorm: its process group is used in training).
            register_bn (bool): True registers ``bn`` as the child ``bn`` (keys ``bn.*``).
                False keeps a reference only, for a parent that already registers ``bn``
                elsewhere (its ``state_dict`` keys then stay where they were).
        Raises:
            TypeError / ValueError: not a Conv2d / BatchNorm2d, or channel counts differ.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected a torch.nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # BatchNorm1d/3d normalise other ranks
            raise TypeError(f"bn: expected a torch.nn.BatchNorm2d (or SyncBatchNorm), got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn: num_features={bn.num_features} does not match conv.out_channels={conv.out_channels}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.backend = getattr(conv, "backend", None)
        self.allow_tf32 = getattr(conv, "allow_tf32", None)
        if register_bn:
            self.bn = bn
        else:
            object.__setattr__(self, "bn", bn)  # a reference, not a child
        src = bn.__dict__.get("original", bn)  # a FoldedBatchNorm2d stands for the module convert() fused
        self.process_group = (src.process_group or _WorldGroup()) if isinstance(src, nn.SyncBatchNorm) else None
        self.train(bn.training)
        return self

    def _bind_bn_owner(self, owner: nn.Module) -> "_ConvBnNd":
        """Have ``owner`` (where the unregistered ``bn`` is registered, beside this module)
        check before each forward that ``bn`` is still its child: replacing it there (e.g. by
        torch.nn.SyncBatchNorm.convert_sync_batchnorm) would otherwise leave this fused conv
        computing with a module the model no longer has."""
        if not any(isinstance(h, _FusedBatchNormCheck) for h in owner._forward_pre_hooks.values()):
            owner.register_forward_pre_hook(_FusedBatchNormCheck())
        return self

    def to_modules(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """(torch.nn.Conv2d, the BatchNorm2d) sharing this module's Parameters and buffers."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device="meta",
        )
        conv.weight = self.weight
        conv.register_parameter("bias", self.bias)
        conv.train(self.training)
        return conv, self.bn

    def _forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        if isinstance(input, Tensor) and input.dim() != 4:  # BatchNorm2d's check, its words
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        bn = self.bn
        # torch.nn.BatchNorm2d.forward's bookkeeping, verbatim in meaning.
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if use_batch_stats:
            track = not bn.training or bn.track_running_stats
            return RF.conv_bn2d(
                input, self.weight, self.bias,
                bn.running_mean if track else None, bn.running_var if track else None,
                bn.weight, bn.bias, True, factor, bn.eps,
                self.stride, self.padding, self.dilation, self.groups,
                padding_mode=self.padding_mode, residual=residual, relu=self._relu,
                process_group=self._sync_group() if bn.training else None,
                allow_tf32=self.allow_tf32, backend=self.backend,
            )
        scale, shift = self._folded()
        weight = self._packed_weight(self.weight, input)
        if _cacheable(weight, scale) and RF.scale_folds_into_weight(input, weight, scale, shift, self.backend):
            weight, scale = self._scaled_weight(weight, scale), None
        return RF.conv2d(
            input, weight, None, self.stride, self.padding, self.dilation, self.groups,
            padding_mode=self.padding_mode, scale=scale, shift=shift, residual=residual, relu=self._relu,
            allow_tf32=self.allow_tf32, backend=self.backend,
        )

    def _scaled_weight(self, weight: Tensor, scale: Tensor) -> Tensor:
        """``weight * scale`` per output channel, which the torch backend would otherwise compute
        on every eval call (a pass over all filters: 9.5 ms of a ResNet-18 forward on a 2-core
        CPU), cached until either changes. Holds one more copy of the filters."""
        return _cached(self, "_scaled_cache", (weight, scale), lambda: weight * scale.view(-1, 1, 1, 1))

    def _sync_group(self):
        if isinstance(self.process_group, _WorldGroup):
            import torch.distributed as dist

            return dist.group.WORLD
        if self.process_group is not None:
            return self.process_group
        if isinstance(self.bn, nn.SyncBatchNorm):
            import torch.distributed as dist

            return self.bn.process_group or dist.group.WORLD
        return None

    def _folded(self) -> tuple[Tensor, Tensor]:
        """Eval BatchNorm (and conv bias) as (scale, shift) (float32, or the parameters' dtype
        where wider, see :func:`resconv.reference.bn_fold`), cached until any input changes."""
        bn = self.bn
        srcs = (self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if not _cacheable(*srcs):
            return RF.bn_fold(*srcs, bn.eps)
        return _cached(self, "_fold_cache", srcs, lambda: RF.bn_fold(*srcs, bn.eps), (bn.eps,))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if "bn" in self._modules else ", bn=<shared>")


class ConvBn2d(_ConvBnNd):
    """Conv2d followed by BatchNorm2d, fused. ``forward(input) -> Tensor``.

    Constructor: torch.nn.Conv2d's arguments (``bias`` defaults to False, as in
    torch.ao.nn.intrinsic.qat.ConvBn2d), then BatchNorm2d's ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, and ``process_group`` (synchronised statistics, as
    nn.SyncBatchNorm). Input Tensor[N, C, H, W] (or [C, H, W]) -> Tensor[N, K, P, Q].
    """

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)


class ConvBnReLU2d(_ConvBnNd):
    """Conv2d, BatchNorm2d and ReLU, fused. ``forward(input) -> Tensor``; see :class:`ConvBn2d`."""

    _relu = True

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)


class ConvBnAddReLU2d(_ConvBnNd):
    """``relu(BN(conv(input)) + residual)`` fused: a ResNet block's second conv.

    ``forward(input, residual)`` with residual Tensor[N, K, P, Q] (the output's shape, dtype
    and device); see :class:`ConvBn2d`.
    """

    _relu = True

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if residual is None:
            raise ValueError("residual: ConvBnAddReLU2d needs a residual tensor (use ConvBnReLU2d without one)")
        return self._forward(input, residual)


class _FusedBatchNormCheck:
    """Forward pre-hook of a module whose fused children compute BatchNorms registered in it
    (see :meth:`_ConvBnNd._bind_bn_owner`); holds no reference, so copies and pickles stay small."""

    def __call__(self, module: nn.Module, args) -> None:
        children = list(module._modules.values())
        for name, m in module._modules.items():
            if isinstance(m, _ConvBnNd) and "bn" not in m._modules and not any(c is m.bn for c in children):
                raise RuntimeError(
                    f"the BatchNorm that the fused conv {type(module).__name__}.{name} computes is no longer a "
                    "child of its parent: it was replaced after fusing (e.g. by "
                    "torch.nn.SyncBatchNorm.convert_sync_batchnorm), so the fused op would compute with a module "
                    "the model no longer has; for synchronized statistics use resconv.nn.convert_sync_batchnorm(model), "
                    "or resconv.revert(model) before changing its BatchNorms"
                )


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Synchronize the batch statistics of every fused module in ``module`` across processes.

    The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for models made of
    (or converted to) resconv modules: each fused conv+BatchNorm gets ``process_group``, so in
    training its per-rank (count, mean, M2) are all-gathered and merged before the
    normalisation, as nn.SyncBatchNorm does; the modules, ``state_dict`` keys and Parameters
    stay the same. BatchNorms that no fused module computes are converted with torch's
    function. (torch's function alone must not be used on models from resconv.models or
    resconv.convert: it replaces BatchNorm modules that fused convs compute but do not hold
    as their child, and the parent's forward then raises.)

    Args:
        module (nn.Module): changed in place.
        process_group (torch.distributed.ProcessGroup or None): the group; None means the
            default (WORLD) group at run time.
    Returns:
        ``module`` (the same object), or a SyncBatchNorm if ``module`` itself is a plain
        BatchNorm (as torch's function).
    """
    fused_bns = set()
    for m in module.modules():
        if isinstance(m, _ConvBnNd):
            m.process_group = process_group if process_group is not None else _WorldGroup()
            fused_bns.add(id(m.bn))
    return _sync_unfused(module, process_group, fused_bns)


class _WorldGroup:
    """Placeholder for 'the default process group', resolved when a forward needs it (the
    group may not exist yet when a model is converted)."""

    def __reduce__(self):
        return (_WorldGroup, ())


def _sync_unfused(module: nn.Module, process_group, fused_bns: set) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in fused_bns \
            and not isinstance(module, (nn.SyncBatchNorm, FoldedBatchNorm2d)):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _sync_unfused(child, process_group, fused_bns)
            if new is not child:
                module._modules[name] = new
    return module


class AddReLU(nn.Module):
    """``relu(input + residual)`` (a skip connection not fused into a conv).

    ``forward(input, residual)``: same shape, dtype, device; output in input's memory format.
    """

    backend: Optional[str] = None

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return RF.add_relu(input, residual, relu=True, backend=self.backend)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose computation was fused into the preceding conv.

    Left by :func:`resconv.convert` where the BatchNorm sat in a container that calls it
    (a ``Sequential``), so that the model's ``state_dict`` keys stay the same. It shares the
    original module's Parameters and buffers (the fused conv reads them from here), and its
    forward returns the input unchanged.
    """

    @classmethod
    def sharing(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        new.register_parameter("weight", bn.weight)
        new.register_parameter("bias", bn.bias)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = getattr(bn, name)
        new.train(bn.training)
        object.__setattr__(new, "original", bn)  # the module revert() puts back
        return new

    def forward(self, input: Tensor) -> Tensor:
        return input
