"""resconv's public functional API, and the one place a backend is chosen.

Backend choice, per call: the ``backend=`` argument, else the ``RESCONV_BACKEND``
environment variable (case-insensitive; unset or empty: auto), else ``"auto"``: the CUDA
extension (CUDA tensors, when built), then Triton (CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1``), then ``"torch"`` (plain PyTorch, any device and dtype). A backend that is forced but cannot serve the call
raises :class:`BackendUnavailableError`, chained to the original cause (import or build
error) where there is one.

Every function validates its arguments first, the same way for all backends and in the
order torch does (see ``resconv._conv_args``): a call torch.nn.functional.conv2d rejects
raises the exception class torch raises (``RuntimeError`` for ATen's checks, through
:class:`~resconv._conv_args.InvalidArgumentError` and
:class:`~resconv._conv_args.InvalidArgumentTypeError`, which are also ``ValueError`` /
``TypeError``) with a message ending in ATen's text. Functions never modify their inputs;
only ``conv_bn2d`` in training mode updates ``running_mean``/``running_var`` in place, as
``torch.nn.functional.batch_norm`` does.

Dtypes a backend cannot serve (complex, float64 for the kernels) go to the torch backend
under "auto"; so do calls with nothing to compute (an empty batch, no input channels), on
every backend. Outputs take the memory format torch.nn.functional.conv2d gives the same
input and weight (:func:`resconv._conv_args.conv_memory_format`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

import resconv._conv_args as A
from ._conv_args import InvalidArgumentError, InvalidArgumentTypeError  # noqa: F401 (raised here, for users)
from .ops import AUTO_ORDER, BACKENDS
from .reference import acc_dtype, bn_fold

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


def scale_folds_into_weight(input: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                            backend: Optional[str] = None) -> bool:
    """Whether :func:`conv2d` with this ``scale`` computes the conv of ``weight * scale`` (the
    torch backend on float32/float64, outside autocast), so that a caller holding
    ``weight * scale.view(-1, 1, 1, 1)`` (as :class:`resconv.nn.ConvBn2d` does in eval) may
    pass it with ``scale=None`` for the same result.

    Args:
        input (Tensor[N, C, H, W] or Tensor[C, H, W]): as in :func:`conv2d`, any memory format.
        weight (Tensor[K, C/groups, R, S]): as in :func:`conv2d`.
        scale (Tensor[K] or None): the epilogue's per-channel scale.
        shift (Tensor[K] or None): the epilogue's per-channel shift.
        backend (str or None): as in :func:`conv2d`.

    Returns:
        bool: True only where the backend that would run the call multiplies the filters by
        ``scale`` and input, weight, scale and shift share a float32 or float64 dtype. False
        for the kernel backends (their epilogue applies the scale to the fp32 accumulator)
        and for anything :func:`conv2d` would reject.

    Raises:
        Nothing: invalid arguments answer False, for :func:`conv2d` to raise on.
    """
    if not all(isinstance(t, Tensor) for t in (input, weight, scale)) or input.dim() not in (3, 4):
        return False
    if input.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(input.device.type):
        return False
    try:
        be = select_backend(backend, input)
    except (ValueError, BackendUnavailableError):
        return False
    return be.folds_scale(input, weight, scale, shift)


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
    """Validate (as F.conv2d, in ATen's order); batch an unbatched input; apply non-zero
    padding modes explicitly (as nn.Conv2d does). Returns (x, residual, geometry, unbatched)."""
    A.check_padding_mode(padding_mode)
    g = A.check_conv_args(input, weight, bias, stride, padding, dilation, groups)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if residual is not None:
        A.check_tensor(residual, "residual")
        if unbatched and residual.dim() == 3:
            residual = residual.unsqueeze(0)
    if padding_mode != "zeros" and any(g.padding):
        t, b, l, r = g.padding
        # The padded input keeps the layout F.pad gives it (contiguous for 'circular'): nn.Conv2d
        # convolves that, and the output format follows it.
        x = F.pad(x, (l, r, t, b), mode=padding_mode)
        g = A.check_conv_args(x, weight, None, g.stride, 0, g.dilation, g.groups)
    A.check_residual(residual, x, g.out_shape)
    return x, residual, g, unbatched


def _backend_for(backend: Optional[str], x: Tensor, g: A.ConvGeometry):
    """The backend that runs a conv: :func:`select_backend`'s (which raises for a forced
    backend that cannot serve x), or the torch backend when there is nothing to compute (an
    empty batch, no input channels), which gives torch's shapes and zero gradients."""
    be = select_backend(backend, x)
    return BACKENDS["torch"] if g.empty else be


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
        input (Tensor[N, C, H, W] or Tensor[C, H, W]): float16, bfloat16, float32, float64 or
            complex (float64 and complex: torch backend); NCHW or channels_last;
            non-contiguous is fine; N == 0 or C == 0 give an empty output, as torch's.
        weight (Tensor[K, C/groups, R, S]): input's dtype and device; NCHW or channels_last.
        bias (Tensor[K] or None): added to the conv output.
        stride (int or (int, int)): positive.
        padding (int, (int, int), 'same' or 'valid'): 'same' pads asymmetrically for even
            kernels (as nn.Conv2d) and needs stride 1.
        dilation (int or (int, int)): positive.
        groups (int): divides C and K (groups == C is depthwise).
        padding_mode (str): 'zeros', 'reflect', 'replicate' or 'circular'.
        scale (Tensor[K] or None): per-output-channel scale of the epilogue (e.g. eval
            BatchNorm folded in, see :func:`resconv.reference.bn_fold`), applied in fp32
            (float64 and complex: in the input's dtype).
        shift (Tensor[K] or None): per-output-channel shift of the epilogue, as ``scale``.
        residual (Tensor[N, K, P, Q] or None): added after ``shift``; input's dtype.
        relu (bool): apply ReLU last.
        allow_tf32 (bool or None): float32 on tensor cores in TF32; None follows
            ``torch.backends.cudnn.allow_tf32`` like nn.Conv2d; False forces IEEE fp32.
        backend (str or None): 'auto', 'triton', 'cuda' or 'torch'; None: ``RESCONV_BACKEND``
            (see the module docstring).

    Returns:
        Tensor[N, K, P, Q] (Tensor[K, P, Q] for unbatched input; K is 0 when C is 0, as
        torch's) in input's dtype, in the memory format torch.nn.functional.conv2d gives
        (channels_last when input or weight is), ``P = (H + pad_top + pad_bottom -
        dilation*(R-1) - 1) // stride + 1`` (Q alike).

    Raises:
        TypeError: non-tensor arguments, non-int geometry arguments (as torch's argument parser).
        InvalidArgumentTypeError (RuntimeError, TypeError): dtypes resconv does not compute
            (integers, ...), dtypes that differ, parameter lists of the wrong length.
        InvalidArgumentError (RuntimeError, ValueError): what F.conv2d rejects (wrong ranks,
            channels not matching weight, groups not dividing the output channels,
            non-positive stride/dilation/groups, negative padding, 'same' with stride > 1, a
            kernel larger than the padded input, an empty kernel, empty spatial input with N,
            C > 0), mixed devices, wrong scale/shift/residual shapes. Messages end in ATen's text.
        ValueError: unknown padding_mode or backend.
        BackendUnavailableError: a forced backend that cannot serve the call.
    """
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    x, residual, g, unbatched = _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode, residual)
    A.check_channel_vector(scale, "scale", g.K, x.device)
    A.check_channel_vector(shift, "shift", g.K, x.device)
    if bias is not None:  # fold the bias into the epilogue, in the accumulation dtype: scale*(acc + b) + shift
        dt = acc_dtype(x.dtype)
        shift = bias.to(dt) * (scale.to(dt) if scale is not None else 1.0) + (shift.to(dt) if shift is not None else 0.0)
    be = _backend_for(backend, x, g)
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
        Tensor[N, K, P, Q] in input's dtype and :func:`conv2d`'s memory format.

    Raises:
        As :func:`conv2d`, and as torch.nn.functional.batch_norm: ValueError for a training
        batch with one value per channel; InvalidArgumentError (RuntimeError, ValueError) for
        running statistics missing in eval mode or per-channel tensors of the wrong size;
        NotImplementedError for complex input (torch has no complex BatchNorm).
    """
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    x, residual, g, unbatched = _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode, residual)
    per_channel = g.N * g.P * g.Q
    world = _world_size(process_group)
    if training and per_channel * world <= 1 and not (per_channel == 0):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(g.out_shape)}")
    if not training and (running_mean is None or running_var is None):
        name = "running_mean" if running_mean is None else "running_var"
        raise A.InvalidArgumentError(f"{name}: required when training=False (eval mode normalises with the running "
                                     f"statistics). {name} must be defined in evaluation mode")
    for t, name, aten_name in ((running_mean, "running_mean", "running_mean"), (running_var, "running_var", "running_var"),
                               (bn_weight, "bn_weight", "weight"), (bn_bias, "bn_bias", "bias")):
        A.check_channel_vector(t, name, g.K, x.device, aten_name)
    if x.is_complex():
        raise NotImplementedError(f"input: BatchNorm of complex tensors is not defined (as in torch). \"batch_norm\" "
                                  f"not implemented for '{A.aten_scalar_type(x.dtype)}'")
    if not training:
        scale, shift = bn_fold(bias, bn_weight, bn_bias, running_mean, running_var, eps)
        be = _backend_for(backend, x, g)
        out = be.conv2d(x, weight, scale, shift, residual, g, relu, _tf32(allow_tf32))
        return out.squeeze(0) if unbatched else out
    be = _backend_for(backend, x, g)
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
        TypeError: non-tensors. InvalidArgumentTypeError (RuntimeError, TypeError): dtypes
        resconv does not compute, or that differ. InvalidArgumentError (RuntimeError,
        ValueError): shapes or devices that differ (no broadcasting).
        NotImplementedError: ReLU of complex tensors (as torch.relu).
    """
    A.check_tensor(input, "input")
    A.check_tensor(residual, "residual")
    input, residual = _autocast(input, residual)
    if tuple(residual.shape) != tuple(input.shape):
        raise A.InvalidArgumentError(f"residual: expected input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    A.check_same(residual, input, "residual")
    x = input
    if x.dim() != 4:  # kernels see [N, C, H, W]; other ranks go through as one channel
        x, residual = x.reshape(1, 1, 1, -1), residual.reshape(1, 1, 1, -1)
    be = select_backend(backend, x)
    if x.numel() == 0:  # nothing to compute: torch's empty result
        be = BACKENDS["torch"]
    out = be.add_relu(x, residual, relu)
    return out.reshape(input.shape) if input.dim() != 4 else out


def _world_size(process_group) -> int:
    if process_group is None:
        return 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)
