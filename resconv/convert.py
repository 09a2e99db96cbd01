"""Rewrite an existing model's conv -> bn (-> relu) (-> + identity -> relu) patterns into
resconv's fused modules, in place, sharing Parameters and buffers; and undo it.

What is rewritten (everything else is left as it is, and reported):

* torchvision's (and timm's, when plain) ResNet ``BasicBlock`` / ``Bottleneck``: replaced by
  :class:`resconv.models.resnet.BasicBlock` / ``Bottleneck`` with the same attribute names;
* a torchvision ``ResNet`` stem (``conv1 -> bn1 -> relu`` called in that order by its forward);
* inside any ``nn.Sequential``: ``Conv2d, BatchNorm2d[, ReLU]`` runs (torchvision's
  ``Conv2dNormActivation`` included), and ``Conv2d, ReLU`` (``inplace`` or not) where no
  BatchNorm follows the conv (a plain CNN: :class:`~resconv.nn.ConvReLU2d`, the conv's bias
  and the ReLU in its epilogue).

These are the places where the conv's output provably reaches only its BatchNorm (and the
BatchNorm's only the ReLU), so fusing cannot change results. A conv in a custom forward is
not rewritten: resconv cannot see who else reads its output.

The ``state_dict`` keys stay the same: each BatchNorm stays registered where it was (a
:class:`~resconv.nn.FoldedBatchNorm2d` where its container would otherwise call it), and the
fused conv takes the conv's place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .models.resnet import BasicBlock, Bottleneck
from .nn import Conv2d, ConvBn2d, ConvBnReLU2d, ConvReLU2d, FoldedBatchNorm2d, _ConvBnNd, _FusedBatchNormCheck


class FoldedReLU(nn.Identity):
    """Where a ReLU was fused into the preceding conv: identity, remembers the original."""

    @classmethod
    def replacing(cls, relu: nn.Module) -> "FoldedReLU":
        new = cls()
        object.__setattr__(new, "original", relu)
        return new


@dataclass
class ConvertReport:
    """What :func:`convert` fused (``(path, pattern)``) and what it left (``(path, reason)``)."""

    fused: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)}:"] + [f"  {p or '<root>'}: {k}" for p, k in self.fused]
        lines += [f"left {len(self.left)}:"] + [f"  {p or '<root>'}: {r}" for p, r in self.left]
        return "\n".join(lines)


def _plain_conv(m) -> bool:
    return type(m) in (nn.Conv2d, Conv2d)


def _plain_bn(m, channels: int) -> bool:
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) and m.num_features == channels


def _is_plain_relu(m) -> bool:
    return type(m) is nn.ReLU


def _tv_block_kind(m):
    """'basic' / 'bottleneck' for torchvision's and plain timm's ResNet blocks, else None."""
    cls = type(m)
    mod = cls.__module__
    if mod == "torchvision.models.resnet" and cls.__name__ in ("BasicBlock", "Bottleneck"):
        return "basic" if cls.__name__ == "BasicBlock" else "bottleneck"
    if mod == "timm.models.resnet" and cls.__name__ in ("BasicBlock", "Bottleneck"):
        # timm's blocks have optional extras; only the plain configuration is a known pattern.
        extras = ("se", "drop_block", "drop_path", "aa")
        if all(getattr(m, e, None) is None or isinstance(getattr(m, e), nn.Identity) for e in extras) \
                and isinstance(getattr(m, "act1", nn.ReLU()), nn.ReLU) \
                and all(isinstance(getattr(m, a, nn.ReLU()), nn.ReLU) for a in ("act2", "act3")):
            return "basic" if cls.__name__ == "BasicBlock" else "bottleneck"
    return None


def _block_ok(m, kind: str) -> str | None:
    """Why a known block cannot be fused (None when it can)."""
    pairs = [("conv1", "bn1"), ("conv2", "bn2")] + ([("conv3", "bn3")] if kind == "bottleneck" else [])
    for c, b in pairs:
        conv, bn = getattr(m, c), getattr(m, b)
        if not _plain_conv(conv) or not _plain_bn(bn, conv.out_channels):
            return f"{c}/{b} is not a plain Conv2d/BatchNorm2d pair"
    return None


def _is_tv_resnet(m) -> bool:
    cls = type(m)
    return (cls.__module__, cls.__name__) in (("torchvision.models.resnet", "ResNet"),)


def convert(model: nn.Module, *, return_report: bool = False):
    """Fuse ``model``'s conv/bn/relu patterns in place (see the module docstring).

    Args:
        model (nn.Module): e.g. a torchvision ResNet; its mode (train/eval), device and
            dtype are kept. A model that is itself one known block cannot be replaced in
            place: pass its parent.
        return_report (bool): also return a :class:`ConvertReport`.
    Returns:
        ``model`` (the same object), or ``(model, report)``.
    Raises:
        TypeError: ``model`` is not an nn.Module (e.g. a model's name: build the model first,
            ``torchvision.models.resnet18()``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module to convert in place, got {type(model).__name__} "
                        f"{model!r:.60}" + (" (a name: build the model first, e.g. torchvision.models.resnet18())"
                                            if isinstance(model, str) else ""))
    report = ConvertReport()
    _convert(model, "", report)
    return (model, report) if return_report else model


def _convert(module: nn.Module, prefix: str, report: ConvertReport) -> None:
    if _is_tv_resnet(module) and _plain_conv(module.conv1) and _plain_bn(module.bn1, module.conv1.out_channels) \
            and _is_plain_relu(module.relu):
        folded = FoldedBatchNorm2d.sharing(module.bn1)
        module.conv1 = _fuse_marked(ConvBnReLU2d, module.conv1, folded)._bind_bn_owner(module)
        module.bn1 = folded
        module.relu = FoldedReLU.replacing(module.relu)
        report.fused.append((_join(prefix, "conv1"), "stem conv-bn-relu"))
    if isinstance(module, nn.Sequential):
        _convert_sequential(module, prefix, report)
    for name, child in list(module.named_children()):
        path = _join(prefix, name)
        kind = _tv_block_kind(child)
        if kind is not None:
            why = _block_ok(child, kind)
            if why is None:
                new = (BasicBlock if kind == "basic" else Bottleneck).from_torchvision(child)
                object.__setattr__(new, "original", child)
                setattr(module, name, new)
                report.fused.append((path, f"{kind} block"))
                continue
            report.left.append((path, why))
        elif _plain_conv(child) and not isinstance(module, nn.Sequential):
            report.left.append((path, "conv in a custom forward: its users cannot be seen"))
        if not isinstance(child, (_ConvBnNd, BasicBlock, Bottleneck)):
            _convert(child, path, report)


def _fuse_marked(cls, conv: nn.Conv2d, folded: FoldedBatchNorm2d) -> _ConvBnNd:
    fused = cls.from_modules(conv, folded, register_bn=False)
    object.__setattr__(fused, "original", conv)  # the module revert() puts back
    return fused


def _convert_sequential(seq: nn.Sequential, prefix: str, report: ConvertReport) -> None:
    keys = list(seq._modules.keys())
    i = 0
    while i < len(keys):
        conv = seq._modules[keys[i]]
        nxt = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
        if _plain_conv(conv) and nxt is not None and _plain_bn(nxt, conv.out_channels):
            relu = seq._modules[keys[i + 2]] if i + 2 < len(keys) else None
            with_relu = relu is not None and _is_plain_relu(relu)
            folded = FoldedBatchNorm2d.sharing(nxt)
            cls = ConvBnReLU2d if with_relu else ConvBn2d
            seq._modules[keys[i]] = _fuse_marked(cls, conv, folded)._bind_bn_owner(seq)
            seq._modules[keys[i + 1]] = folded
            if with_relu:
                seq._modules[keys[i + 2]] = FoldedReLU.replacing(relu)
            report.fused.append((_join(prefix, keys[i]), "conv-bn-relu" if with_relu else "conv-bn"))
            i += 3 if with_relu else 2
            continue
        if _plain_conv(conv) and nxt is not None and _is_plain_relu(nxt):  # no BatchNorm: conv + ReLU
            fused = ConvReLU2d.from_modules(conv)
            object.__setattr__(fused, "original", conv)  # the module revert() puts back
            seq._modules[keys[i]] = fused
            seq._modules[keys[i + 1]] = FoldedReLU.replacing(nxt)
            report.fused.append((_join(prefix, keys[i]), "conv-relu"))
            i += 2
            continue
        if _plain_conv(conv):
            report.left.append((_join(prefix, keys[i]), "conv not followed by a BatchNorm2d of its channels or a ReLU"))
        i += 1


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: torch.nn modules (and torchvision blocks) back, sharing
    the current Parameters and buffers. Returns ``model``.

    Raises:
        TypeError: ``model`` is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _revert(model)
    return model


def _restore_bn(folded: FoldedBatchNorm2d) -> nn.BatchNorm2d:
    """The original BatchNorm, given the folded one's current Parameters and buffers (a
    ``.to()`` after convert moved the folded module's, not the original's)."""
    bn = folded.original
    bn.register_parameter("weight", folded.weight)
    bn.register_parameter("bias", folded.bias)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bn._buffers[name] = folded._buffers[name]
    bn.train(folded.training)
    return bn


def _restore_conv(fused: Conv2d, conv: nn.Conv2d) -> nn.Conv2d:
    conv.register_parameter("weight", fused.weight)
    conv.register_parameter("bias", fused.bias)
    conv.train(fused.training)
    return conv


def _revert(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, _FusedBatchNormCheck):  # convert() put it there
            del module._forward_pre_hooks[key]
    for name, child in list(module._modules.items()):
        orig = None if child is None else child.__dict__.get("original")
        if orig is None:
            if child is not None:
                _revert(child)
            continue
        if isinstance(child, (BasicBlock, Bottleneck)):
            n = 3 if isinstance(child, Bottleneck) else 2
            for k in range(1, n + 1):
                _restore_conv(getattr(child, f"conv{k}"), getattr(orig, f"conv{k}"))
            if child.downsample is not orig.downsample:  # fused by from_torchvision
                _restore_conv(child.downsample[0], orig.downsample[0])
                orig.downsample._modules["1"] = _restore_bn(child.downsample[1])
            orig.train(child.training)
            module._modules[name] = orig
        elif isinstance(child, (_ConvBnNd, ConvReLU2d)):
            module._modules[name] = _restore_conv(child, orig)
        elif isinstance(child, FoldedBatchNorm2d):
            module._modules[name] = _restore_bn(child)
        elif isinstance(child, FoldedReLU):
            module._modules[name] = orig


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
