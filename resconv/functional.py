"""resconv's public functional API, and the one place a backend is chosen.

Backend choice, per call: the ``backend=`` argument, else the ``RESCONV_BACKEND``
environment variable (case-insensitive; unset or empty: auto), else ``"auto"``: the CUDA
extension (CUDA tensors, when built), then Triton (CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1``), then ``"torch"`` (plain PyTorch, any device and dtype). A backend that is forced but cannot serve the call
raises :class:`BackendUnavailableError`, chained to the original cause (import or build
error) where there is one.

Every function validates its arguments first, the same way for all backends (see
``resconv._conv_args``), and never modifies its inputs; only ``conv_bn2d`` in training mode
updates ``running_mean``/``running_var`` in place, as ``torch.nn.functional.batch_norm`` does.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

import resconv._conv_args as A
from .ops import AUTO_ORDER, BACKENDS
from .reference import bn_fold

Tensor = torch.Tensor
IntOrPair = Union[int, Sequence[int]]

BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot serve this call (not installed, not built,
    unsupported device or dtype). ``__cause__`` holds the original error when there is one."""


def available_backends(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """``{name: None or reason}`` for every backend, for tensors of ``device``/``dtype``."""
    device = torch.device(device)
    return {name: b.unavailable_reason(device, dtype) for name, b in BACKENDS.items()}


def unavailable_reason(backend: str, device: Union[str, torch.device], dtype: torch.dtype) -> Optional[str]:
    """Why backend ``backend`` ('torch', 'triton' or 'cuda') cannot serve tensors of
    ``device``/``dtype``, or None when it can. Only that backend is asked (asking 'cuda' about
    a CUDA device loads the extension, compiling it just in time on first use).

    Raises:
        ValueError: an unknown backend name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {tuple(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend].unavailable_reason(torch.device(device), dtype)


BACKEND_ENV = "RESCONV_BACKEND"


def env_backend() -> str:
    """The default backend of every call: ``RESCONV_BACKEND`` (case-insensitive; unset or
    empty: 'auto').

    Raises:
        ValueError: a value that names no backend.
    """
    raw = os.environ.get(BACKEND_ENV, "")
    value = raw.strip().lower()
    if not value:
        return "auto"
    if value not in BACKEND_NAMES:
        raise ValueError(f"{BACKEND_ENV}: expected one of {BACKEND_NAMES} (case-insensitive; empty means auto), "
                         f"got {raw!r}")
    return value


def select_backend(backend: Optional[str], x: Tensor):
    """The backend object that will run a call on ``x`` (see the module docstring).

    Raises:
        ValueError: an unknown name (in ``backend`` or ``RESCONV_BACKEND``).
        BackendUnavailableError: a forced backend that cannot serve ``x``'s device and dtype.
    """
    from_env = backend is None
    name = env_backend() if from_env else backend
    if name == "auto":
        for cand in AUTO_ORDER:
            b = BACKENDS[cand]
            if b.unavailable_reason(x.device, x.dtype) is None:
                return b
        raise BackendUnavailableError("no backend can serve this call")  # torch always can
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")
    b = BACKENDS[name]
    reason = b.unavailable_reason(x.device, x.dtype)
    if reason is not None:
        origin = f"{BACKEND_ENV}={name}: " if from_env else ""
        raise BackendUnavailableError(
            f"{origin}backend {name!r} cannot run on a {x.dtype} tensor on {x.device}: {reason}"
        ) from b.cause
    return b


def _autocast(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under torch.autocast, cast floating operands to the autocast dtype as nn.Conv2d does."""
    if not tensors or not isinstance(tensors[0], torch.Tensor):
        return tensors  # nothing to cast; validation names a non-tensor argument afterwards
    dev = tensors[0].device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(
        t.to(dt) if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64) else t
        for t in tensors
    )


def _tf32(allow_tf32: Optional[bool]) -> bool:
    return torch.backends.cudnn.allow_tf32 if allow_tf32 is None else bool(allow_tf32)


def _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode, residual):
    """Validate; batch an unbatched input; apply non-zero padding modes explicitly (as
    nn.Conv2d does). Returns (x, residual, geometry, unbatched)."""
    A.check_tensor(input, "input", dims=(3, 4))
    A.check_padding_mode(padding_mode)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if residual is not None:
        A.check_tensor(residual, "residual")
        if unbatched and residual.dim() == 3:
            residual = residual.unsqueeze(0)
    g = A.conv_geometry(x, weight, stride, padding, dilation, groups)
    A.check_channel_vector(bias, "bias", g.K, x.device)
    if bias is not None:
        A.check_same(bias, x, "bias")
    if padding_mode != "zeros" and any(g.padding):
        t, b, l, r = g.padding
        # F.pad may return another layout: keep the input's, which the output follows.
        x = F.pad(x, (l, r, t, b), mode=padding_mode).contiguous(memory_format=A.memory_format_of(x))
        g = A.conv_geometry(x, weight, g.stride, (0, 0, 0, 0), g.dilation, g.groups)
    A.check_residual(residual, x, g.out_shape)
    return x, residual, g, unbatched


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[str, IntOrPair] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    allow_tf32: Optional[bool] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Fused 2-D convolution: ``out = act(scale * (conv2d(input, weight) + bias) + shift + residual)``.

    The arguments up to ``groups`` are those of ``torch.nn.functional.conv2d``; with no
    keyword extras this computes exactly what it computes.

    Args:
        input (Tensor[N, C, H, W] or Tensor[C, H, W]): float16, bfloat16, float32 or float64
            (float64: torch backend); NCHW or channels_last; non-contiguous is fine.
        weight (Tensor[K, C/groups, R, S]): input's dtype and device.
        bias (Tensor[K] or None): added to the conv output.
        stride (int or (int, int)): positive.
        padding (int, (int, int), 'same' or 'valid'): 'same' pads asymmetrically for even
            kernels (as nn.Conv2d) and needs stride 1.
        dilation (int or (int, int)): positive.
        groups (int): divides C and K (groups == C is depthwise).
        padding_mode (str): 'zeros', 'reflect', 'replicate' or 'circular'.
        scale (Tensor[K] or None): per-output-channel scale of the epilogue (e.g. eval
            BatchNorm folded in, see :func:`resconv.reference.bn_fold`), applied in fp32.
        shift (Tensor[K] or None): per-output-channel shift of the epilogue.
        residual (Tensor[N, K, P, Q] or None): added after ``shift``; input's dtype.
        relu (bool): apply ReLU last.
        allow_tf32 (bool or None): float32 on tensor cores in TF32; None follows
            ``torch.backends.cudnn.allow_tf32`` like nn.Conv2d; False forces IEEE fp32.
        backend (str or None): 'auto', 'triton', 'cuda' or 'torch'; None: ``RESCONV_BACKEND``
            (see the module docstring).

    Returns:
        Tensor[N, K, P, Q] (Tensor[K, P, Q] for unbatched input) in input's dtype and memory
        format, ``P = (H + pad_top + pad_bottom - dilation*(R-1) - 1) // stride + 1`` (Q alike).

    Raises:
        TypeError: non-tensor arguments, non-floating dtypes, dtype mismatches.
        ValueError: wrong ranks or shapes, channels not matching weight, groups not dividing
            the channels, non-positive stride/dilation, negative padding, 'same' with
            stride > 1, a kernel larger than the padded input, mixed devices, unknown backend.
        BackendUnavailableError: a forced backend that cannot serve the call.
    """
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    x, residual, g, unbatched = _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode, residual)
    A.check_channel_vector(scale, "scale", g.K, x.device)
    A.check_channel_vector(shift, "shift", g.K, x.device)
    if bias is not None:  # fold the bias into the epilogue: scale*(acc + b) + shift, in the epilogue's precision
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 biases must stay float64
        shift = bias.to(dt) * (scale.to(dt) if scale is not None else 1.0) + (shift.to(dt) if shift is not None else 0.0)
    be = select_backend(backend, x)
    out = be.conv2d(x, weight, scale, shift, residual, g, relu, _tf32(allow_tf32))
    return out.squeeze(0) if unbatched else out


def conv_bn2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: IntOrPair = 1,
    padding: Union[str, IntOrPair] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    residual: Optional[Tensor] = None,
    relu: bool = False,
    process_group=None,
    allow_tf32: Optional[bool] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Fused ``act(batch_norm(conv2d(input, weight, bias)) + residual)``.

    BatchNorm arguments follow ``torch.nn.functional.batch_norm``: with ``training=True``
    the batch statistics normalise (biased variance) and, when given, ``running_mean`` and
    ``running_var`` are updated in place (``running = (1 - momentum) * running + momentum *
    batch``, unbiased variance); with ``training=False`` the running statistics are folded
    into the conv epilogue. Statistics are reduced from the conv's fp32 accumulator in
    per-tile partials merged with Chan's formula.

    Args:
        input (Tensor[N, C, H, W] or Tensor[C, H, W]): as in :func:`conv2d`.
        weight (Tensor[K, C/groups, R, S]): as in :func:`conv2d`.
        bias (Tensor[K] or None): the conv's bias, as in :func:`conv2d`.
        running_mean (Tensor[K] or None): required when ``training=False``; updated in place
            when training.
        running_var (Tensor[K] or None): as ``running_mean`` (unbiased variance).
        bn_weight (Tensor[K] or None): gamma (None: 1).
        bn_bias (Tensor[K] or None): beta (None: 0).
        training (bool): batch statistics (True) or the running ones (False).
        momentum (float): of the running-statistics update.
        eps (float): added to the variance.
        stride (int or (int, int)): as in :func:`conv2d`.
        padding (int, (int, int), 'same' or 'valid'): as in :func:`conv2d`.
        dilation (int or (int, int)): as in :func:`conv2d`.
        groups (int): as in :func:`conv2d`.
        padding_mode (str): as in :func:`conv2d`.
        residual (Tensor[N, K, P, Q] or None): added after BatchNorm.
        relu (bool): apply ReLU last.
        process_group (torch.distributed.ProcessGroup or None): synchronise batch statistics
            over this group (as nn.SyncBatchNorm) when training; None: local statistics.
        allow_tf32 (bool or None): as in :func:`conv2d`.
        backend (str or None): as in :func:`conv2d`.

    Returns:
        Tensor[N, K, P, Q] in input's dtype and memory format.

    Raises:
        ValueError: as :func:`conv2d`; running statistics missing in eval mode; a training
            batch with one value per channel (the error nn.BatchNorm2d raises).
    """
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    x, residual, g, unbatched = _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode, residual)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (bn_weight, "bn_weight"), (bn_bias, "bn_bias")):
        A.check_channel_vector(t, name, g.K, x.device)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean, running_var: required when training=False")
        scale, shift = bn_fold(bias, bn_weight, bn_bias, running_mean, running_var, eps)
        be = select_backend(backend, x)
        out = be.conv2d(x, weight, scale, shift, residual, g, relu, _tf32(allow_tf32))
        return out.squeeze(0) if unbatched else out
    per_channel = g.N * g.P * g.Q
    world = _world_size(process_group)
    if per_channel * world <= 1 and not (per_channel == 0):
        shape = (g.N, g.K, g.P, g.Q)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}")
    be = select_backend(backend, x)
    if per_channel == 0 and world == 1:  # empty batch: empty output, statistics untouched
        out = BACKENDS["torch"].conv_bn_train(
            x, weight, bias, bn_weight, bn_bias, None, None, momentum, eps, residual, g, relu, False, None
        )
    else:
        out = be.conv_bn_train(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, residual, g, relu,
            _tf32(allow_tf32), process_group if world > 1 else None,
        )
    return out.squeeze(0) if unbatched else out


def add_relu(input: Tensor, residual: Tensor, *, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """``out = act(input + residual)``: a skip connection not fused into a conv.

    Args:
        input (Tensor[N, C, H, W] or any shape with dim >= 1): computed in fp32 and rounded once.
        residual (Tensor): input's shape, dtype and device.
        relu (bool): apply ReLU (else a plain add).
        backend (str or None): as in :func:`conv2d`.
    Returns:
        Tensor of input's shape, dtype and memory format.
    Raises:
        TypeError / ValueError: non-tensors, non-floating or mismatched dtypes, shapes or devices.
    """
    A.check_tensor(input, "input")
    A.check_tensor(residual, "residual")
    input, residual = _autocast(input, residual)
    if tuple(residual.shape) != tuple(input.shape):
        raise ValueError(f"residual: expected input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    A.check_same(residual, input, "residual")
    x = input
    if x.dim() != 4:  # kernels see [N, C, H, W]; other ranks go through as one channel
        x, residual = x.reshape(1, 1, 1, -1), residual.reshape(1, 1, 1, -1)
    be = select_backend(backend, x)
    out = be.add_relu(x, residual, relu)
    return out.reshape(input.shape) if input.dim() != 4 else out


def _world_size(process_group) -> int:
    if process_group is None:
        return 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)
