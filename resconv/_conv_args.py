"""Validation and normalisation of convolution arguments, shared by every backend.

Everything a user passes is checked here, once, before any backend runs, so that every
backend raises the same error for the same bad input. The checks of a conv run in the order
ATen's ``conv2d`` runs them (aten/src/ATen/native/Convolution.cpp: ``conv2d``, ``batchify``,
``_convolution``, ``check_shape_forward``, ``_select_conv_backend``,
``check_input_same_type_as_parameters``), so the first error found is the one
``torch.nn.functional.conv2d`` raises for the same call, with the exception class torch
raises (``RuntimeError`` for ATen's checks: :class:`InvalidArgumentError`,
:class:`InvalidArgumentTypeError`) and a message made of resconv's sentence naming the
argument, then ATen's text. Nothing here touches tensor data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch._prims_common import suggest_memory_format

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPLEX_DTYPES = (torch.complex32, torch.complex64, torch.complex128)
DTYPES = FLOAT_DTYPES + COMPLEX_DTYPES  # what resconv computes (complex: on the torch backend)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrPair = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
class InvalidArgumentError(RuntimeError, ValueError):
    """A bad shape, size, geometry value or device. ATen raises ``RuntimeError`` for these
    (so does resconv, through this class); it is also a ``ValueError``, what resconv raised
    before it followed torch."""


class InvalidArgumentTypeError(RuntimeError, TypeError):
    """A tensor of the wrong dtype, or a parameter list of the wrong length. ATen raises
    ``RuntimeError`` for these; this class is also a ``TypeError``, what resconv raised
    before it followed torch. (A non-tensor or non-int argument raises a plain ``TypeError``,
    as torch's argument parser does.)"""


def _error(cls: type, sentence: str, aten: Optional[str] = None) -> Exception:
    """resconv's sentence, then ATen's text for the same call."""
    return cls(sentence if aten is None else f"{sentence}. {aten}")


# How ATen names a dtype in its messages: (ScalarType name, caffe2 TypeMeta name).
_ATEN_NAMES = {
    torch.float16: ("Half", "c10::Half"),
    torch.bfloat16: ("BFloat16", "c10::BFloat16"),
    torch.float32: ("Float", "float"),
    torch.float64: ("Double", "double"),
    torch.complex32: ("ComplexHalf", "c10::complex<c10::Half>"),
    torch.complex64: ("ComplexFloat", "c10::complex<float>"),
    torch.complex128: ("ComplexDouble", "c10::complex<double>"),
    torch.uint8: ("Byte", "unsigned char"),
    torch.int8: ("Char", "signed char"),
    torch.int16: ("Short", "short int"),
    torch.int32: ("Int", "int"),
    torch.int64: ("Long", "long int"),
    torch.bool: ("Bool", "bool"),
}
# Tensor types torch's Python layer renames in ATen's messages ("CPUFloatType" becomes
# "torch.FloatTensor", torch/csrc/Exceptions.cpp); the others keep ATen's name.
_LEGACY_NAMED = (torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.bool)


def aten_dtype_name(dtype: torch.dtype) -> str:
    """ATen's ``dtype().name()`` (``float``, ``c10::Half``, ...)."""
    return _ATEN_NAMES.get(dtype, (None, str(dtype)))[1]


def aten_scalar_type(dtype: torch.dtype) -> str:
    """ATen's ScalarType name (``Float``, ``ComplexFloat``, ...)."""
    return _ATEN_NAMES.get(dtype, (str(dtype), None))[0]


def aten_tensor_type(t: torch.Tensor) -> str:
    """A tensor's type as ATen's messages show it in Python (``torch.FloatTensor``,
    ``torch.cuda.HalfTensor``, ``CPUBFloat16Type``, ``CPUComplexFloatType``)."""
    if t.dtype in _LEGACY_NAMED:
        return t.type()
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(t.device.type, t.device.type)
    return f"{key}{aten_scalar_type(t.dtype)}Type"


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------
class Padding4(NamedTuple):
    """Explicit zero padding (top, bottom, left, right): resconv's normalised form (asymmetric
    for 'same' with even kernels). Users pass nn.Conv2d's forms; this type marks the normalised one."""

    top: int
    bottom: int
    left: int
    right: int


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one 2-D convolution in the field's names.

    Input ``N C H W``, filter ``K (C/groups) R S``, output ``N K P Q`` (``N 0 P Q`` when
    C == 0, as torch's). ``padding`` is ``(top, bottom, left, right)`` zero padding
    (asymmetric for ``'same'`` with even kernels).
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    P: int
    Q: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.N, 0 if self.C == 0 else self.K, self.P, self.Q)

    @property
    def empty(self) -> bool:
        """No work: an empty batch or no input channels (ATen's "Empty" conv backend)."""
        return self.N == 0 or self.C == 0


def conv_out_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(N, K, P, Q) of a conv of x (shape [N, C, H, W]) with weight (shape [K, C/groups, R, S]),
    ``padding`` (top, bottom, left, right): ``P = (H + top + bottom - dilation*(R-1) - 1) // stride + 1``
    (Q alike), as torch.nn.Conv2d's documentation gives it; K is 0 when C is 0 (ATen's
    ``calc_output_size``). No checks: see :func:`check_conv_args`."""
    N, C, H, W = x_shape
    K, _, R, S = weight_shape
    P = (H + padding[0] + padding[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + padding[2] + padding[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return (N, 0 if C == 0 else K, P, Q)


def _int_list(value, name: str) -> tuple[int, ...]:
    """An int (repeated twice, as F.conv2d's ``int[2]`` parameters take it) or a sequence of
    ints; anything else is the TypeError torch's argument parser raises."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got bool {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name}: expected ints, got {value!r}")
        return tuple(value)
    raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def resolve_padding(padding: Union[str, Sequence[int]], kernel: tuple[int, int],
                    dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``'valid'``, ``'same'`` or a pair of ints -> ``(top, bottom, left, right)`` (no checks).

    ``'same'`` follows torch.nn.Conv2d: total ``dilation * (kernel - 1)``, the smaller half
    before, the extra element after (so even kernels pad asymmetrically).
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    ph, pw = _pair(tuple(padding))
    return (ph, ph, pw, pw)


def check_tensor(t, name: str) -> None:
    """``t`` is a tensor of a dtype resconv computes (floating or complex)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise InvalidArgumentTypeError(
            f"{name}: expected a floating or complex dtype (float16, bfloat16, float32, float64, complex32, "
            f"complex64, complex128), got {t.dtype}"
        )


def _check_is_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_same_type(x: torch.Tensor, t: torch.Tensor, name: str) -> None:
    """ATen's check_input_same_type_as_parameters for one parameter: same dtype and device."""
    if t.dtype == x.dtype and t.device == x.device:
        return
    aten = f"Input type ({aten_tensor_type(x)}) and {name} type ({aten_tensor_type(t)}) should be the same"
    if t.dtype != x.dtype:
        raise _error(InvalidArgumentTypeError, f"{name}: expected dtype {x.dtype} (the dtype of input), got {t.dtype}",
                     aten)
    raise _error(InvalidArgumentError, f"{name}: expected a tensor on input's device {x.device}, got {t.device}", aten)


def _check_weight_dims(weight: torch.Tensor) -> None:
    if weight.dim() <= 2:
        raise _error(InvalidArgumentError, f"weight: expected a 4-D tensor, got shape {tuple(weight.shape)}",
                     "weight should have at least three dimensions")


def _check_groups(groups: int) -> None:
    if groups <= 0:
        raise _error(InvalidArgumentError, f"groups: expected a positive int, got {groups!r}",
                     "non-positive groups is not supported")


def _check_same_padding(weight: torch.Tensor, xs: list, st: tuple, dl: tuple, stride) -> None:
    """ATen's convolution_same checks (xs: the batched input's size)."""
    _check_weight_dims(weight)
    ws = list(weight.shape)
    if weight.dim() != 4:
        raise _error(InvalidArgumentError, f"weight: expected a 4-D tensor, got shape {tuple(ws)}",
                     f"Expected {weight.dim()}-dimensional input for {weight.dim()}-dimensional weight{ws}, but got "
                     f"4-dimensional input of size {xs} instead")
    for name, v in (("stride", st), ("dilation", dl)):
        if len(v) not in (1, 2):
            raise _error(InvalidArgumentTypeError, f"{name}: expected an int or a pair of ints, got {v!r}",
                         f"{name} cannot broadcast to 2 dimensions")
    if any(s != 1 for s in st):
        raise _error(InvalidArgumentError, f"padding: 'same' needs stride 1, got stride={stride!r}",
                     "padding='same' is not supported for strided convolutions")


def check_conv_args(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: IntOrPair,
    padding: Union[str, IntOrPair, Padding4],
    dilation: IntOrPair,
    groups: int,
) -> ConvGeometry:
    """Check ``torch.nn.functional.conv2d``'s arguments as ATen does, in its order, and return
    the geometry of the batched conv (an unbatched ``input`` counts as a batch of one).

    Args:
        input (Tensor[N, C, H, W] or Tensor[C, H, W]), weight (Tensor[K, C/groups, R, S]),
        bias (Tensor[K] or None): one dtype (floating or complex) and device.
        stride, dilation (int or (int, int)); padding (int, (int, int), 'same', 'valid', or a
        :class:`Padding4`); groups (int).

    Raises:
        TypeError: a non-tensor, or a non-int geometry argument (torch's argument parser).
        InvalidArgumentTypeError (RuntimeError, TypeError): an unsupported dtype, dtypes that
            differ, a stride/padding/dilation list of the wrong length.
        InvalidArgumentError (RuntimeError, ValueError): wrong ranks, channels not matching
            ``weight``, groups not dividing the output channels, non-positive stride/dilation/
            groups, negative padding, an unknown padding string, 'same' with stride > 1, a
            kernel larger than the padded input, empty spatial input with N, C > 0, an empty
            kernel, devices that differ.
    """
    check_tensor(input, "input")
    _check_is_tensor(weight, "weight")
    if bias is not None:
        _check_is_tensor(bias, "bias")
    st = _int_list(stride, "stride")
    dl = _int_list(dilation, "dilation")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups: expected an int, got {groups!r}")
    mode = padding if isinstance(padding, str) else None
    pd = None if mode is not None or isinstance(padding, Padding4) else _int_list(padding, "padding")
    ws, xs = list(weight.shape), list(input.shape)
    # at::conv2d (numeric padding) checks the bias dtype before anything else.
    if mode is None and bias is not None and bias.dtype != input.dtype:
        raise _error(InvalidArgumentTypeError, f"bias: expected dtype {input.dtype} (the dtype of input), got {bias.dtype}",
                     f"Input type ({aten_dtype_name(input.dtype)}) and bias type ({aten_dtype_name(bias.dtype)}) "
                     "should be the same")
    if input.dim() not in (3, 4):  # batchify
        raise _error(InvalidArgumentError, f"input: expected a 3-D (unbatched) or 4-D (batched) tensor, got shape "
                     f"{tuple(input.shape)}",
                     f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {xs}")
    if input.dim() == 3:
        xs = [1] + xs
    if input.is_complex():  # complex_convolution checks the types first
        _check_same_type(input, weight, "weight")
        if bias is not None:
            _check_same_type(input, bias, "bias")
    if mode is not None:  # _convolution_mode: the padding string, groups, then convolution_same's checks
        if mode not in ("same", "valid"):
            raise _error(InvalidArgumentError, f"padding: expected an int, a pair of ints, 'same' or 'valid', got "
                         f"{padding!r}", f"Invalid padding string: '{padding}'")
        _check_groups(groups)
    if mode == "same":
        _check_same_padding(weight, xs, st, dl, stride)
    # _convolution
    _check_weight_dims(weight)
    _check_groups(groups)
    dim = weight.dim() - 2
    for name, v in (("stride", st), ("padding", pd), ("dilation", dl)):
        if v is not None and len(v) not in (1, dim):
            aten = (f"expected {name} to be a single integer value or a list of {dim} values to match the convolution "
                    f"dimensions, but got {name}={list(v)}")
            if weight.dim() != 4:  # the lists have two values: the weight's rank is what is wrong
                raise _error(InvalidArgumentError, f"weight: expected a 4-D tensor, got shape {tuple(ws)}", aten)
            raise _error(InvalidArgumentTypeError, f"{name}: expected an int or a pair of ints, got {v!r}", aten)
    st2, dl2 = _pair(st), _pair(dl)
    K, Cg, R, S = ws
    if isinstance(padding, Padding4):
        pad = tuple(padding)
    else:
        pad = resolve_padding(mode if mode is not None else pd, (R, S), dl2)
    # check_shape_forward
    if any(p < 0 for p in pad):
        raise _error(InvalidArgumentError, f"padding: expected non-negative values, got {padding!r}",
                     "negative padding is not supported")
    if any(s <= 0 for s in st2):
        raise _error(InvalidArgumentError, f"stride: expected positive values, got {stride!r}",
                     "non-positive stride is not supported")
    if any(d <= 0 for d in dl2):
        raise _error(InvalidArgumentError, f"dilation: expected positive values, got {dilation!r}",
                     "non-positive dilation is not supported")
    # (weight.dim() == input.dim() holds here: with two-value lists a weight of another rank failed above)
    if K < groups:
        raise _error(InvalidArgumentError, f"weight: expected at least groups={groups} output channels "
                     f"(weight.shape[0]), got weight of shape {tuple(ws)}",
                     f"Given groups={groups}, expected weight to be at least {groups} at dimension 0, but got weight "
                     f"of size {ws} instead")
    if K % groups != 0:
        raise _error(InvalidArgumentError, f"groups: out_channels={K} (weight.shape[0]) is not divisible by "
                     f"groups={groups}",
                     f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but got "
                     f"weight of size [{ws}] instead")  # sic: ATen prints the size in two brackets
    N, C, H, W = xs
    if C != Cg * groups:
        raise _error(InvalidArgumentError, f"input: expected {Cg * groups} channels (weight.shape[1] * groups = "
                     f"{Cg} * {groups}), got {C} channels (input of shape {tuple(input.shape)})",
                     f"Given groups={groups}, weight of size {ws}, expected input{xs} to have {Cg * groups} "
                     f"channels, but got {C} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != K):
        raise _error(InvalidArgumentError, f"bias: expected shape ({K},) (one value per output channel), got "
                     f"{tuple(bias.shape)}",
                     f"Given weight of size {ws}, expected bias to be 1-dimensional with {K} elements, but got bias "
                     f"of size {list(bias.shape)} instead")
    hp, wp = H + pad[0] + pad[1], W + pad[2] + pad[3]
    er, es = dl2[0] * (R - 1) + 1, dl2[1] * (S - 1) + 1
    if hp < er or wp < es:
        raise _error(InvalidArgumentError, f"input: padded input size ({hp} x {wp}) is smaller than the dilated kernel "
                     f"({er} x {es}); the kernel can't be greater than the padded input",
                     f"Calculated padded input size per channel: ({hp} x {wp}). Kernel size: ({er} x {es}). Kernel "
                     "size can't be greater than actual input size")
    # _select_conv_backend: only an empty batch or no channels may make an empty input
    if N > 0 and C > 0 and H * W == 0:
        raise _error(InvalidArgumentError, f"input: expected non-empty spatial dimensions (an empty batch or zero "
                     f"channels are fine), got shape {tuple(input.shape)}",
                     f"Only zero batch or zero channel inputs are supported, but got input shape: {xs}")
    if not (N == 0 or C == 0) and (R == 0 or S == 0):  # the error of ATen's CPU kernel (others word it their way)
        raise _error(InvalidArgumentError, f"weight: expected a non-empty kernel, got shape {tuple(ws)}",
                     f"kernel size should be greater than zero, but got kernel_height: {R} kernel_width: {S}")
    if not input.is_complex():  # check_input_same_type_as_parameters, once a backend is chosen
        _check_same_type(input, weight, "weight")
        if bias is not None:
            _check_same_type(input, bias, "bias")
    _, _, P, Q = conv_out_shape(xs, ws, st2, pad, dl2)
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, st2, pad, dl2, groups)  # type: ignore[arg-type]


def conv_geometry(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntOrPair,
    padding: Union[str, IntOrPair, Sequence[int]],
    dilation: IntOrPair,
    groups: int,
) -> ConvGeometry:
    """:func:`check_conv_args` without a bias, for callers with normalised arguments:
    ``padding`` may also be an explicit ``(top, bottom, left, right)`` sequence."""
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in padding):
            raise TypeError(f"padding: expected four ints, got {padding!r}")
        padding = Padding4(*padding)
    return check_conv_args(x, weight, None, stride, padding, dilation, groups)


def check_same(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str = "input") -> None:
    """`t` must live on `ref`'s device and have its dtype."""
    if t.device != ref.device:
        raise InvalidArgumentError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype:
        raise InvalidArgumentTypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_channel_vector(t: Optional[torch.Tensor], name: str, K: int, device: torch.device,
                         aten_name: Optional[str] = None) -> None:
    """A per-output-channel vector (bias, scale, shift, BN parameters/statistics): shape [K].

    ``aten_name``: the name torch.nn.functional.batch_norm gives it in its element-count
    error (``running_mean``, ``weight``, ...), whose text is added where it applies.
    """
    if t is None:
        return
    check_tensor(t, name)
    if tuple(t.shape) != (K,):
        aten = f"{aten_name} should contain {K} elements not {t.numel()}" if aten_name and t.numel() != K else None
        raise _error(InvalidArgumentError, f"{name}: expected shape ({K},) (one value per output channel), got "
                     f"{tuple(t.shape)}", aten)
    if t.device != device:
        raise InvalidArgumentError(f"{name}: expected a tensor on {device}, got {t.device}")


def check_residual(residual: Optional[torch.Tensor], x: torch.Tensor, out_shape: Sequence[int]) -> None:
    if residual is None:
        return
    check_tensor(residual, "residual")
    if tuple(residual.shape) != tuple(out_shape):
        raise InvalidArgumentError(f"residual: expected the output's shape {tuple(out_shape)}, got {tuple(residual.shape)}")
    check_same(residual, x, "residual")


def check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")


# ------------------------------------------------------------------------------------------
# memory formats
# ------------------------------------------------------------------------------------------
def conv_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format torch.nn.functional.conv2d gives its output, for x (Tensor[N, C, H, W])
    and weight: channels_last when either suggests it (``Tensor.suggest_memory_format()``),
    else contiguous.

    That is ATen's rule (Convolution.cpp ``determine_backend_memory_format``; ConvUtils.h
    ``mkldnn_conv_use_channels_last``, ``thnn_conv_use_channels_last``,
    ``cudnn_conv_suggest_memory_format``) with its exceptions: contiguous for an empty batch
    or no input channels (the "Empty" backend); on CUDA contiguous for float64/complex128 and
    where cuDNN is off or missing (cuDNN's rule excludes double; the other CUDA kernels write
    contiguous outputs). Checked against torch on CPU in tests/test_dropin.py.
    """
    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.contiguous_format
    if x.device.type == "cuda":
        cudnn = torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()
        if not cudnn or torch.float64 in (x.dtype.to_real(), weight.dtype.to_real()):
            return torch.contiguous_format
    if _suggests_channels_last(x) or _suggests_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


def _suggests_channels_last(t: torch.Tensor) -> bool:
    """``t.suggest_memory_format() == torch.channels_last`` for a 4-D tensor. Where no size is
    1 and exactly one of the two layouts is dense, the strides are exactly NCHW's or NHWC's,
    so the contiguity flags answer as ATen's stride rule does; every other tensor (a size-1
    dimension, whose stride the flags ignore and the rule does not; slices; empty) takes
    torch's own rule, which costs about 10 us a call in Python (a ResNet-18 forward asks 40
    times)."""
    if min(t.shape) > 1:
        nchw, nhwc = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
        if nchw != nhwc:
            return nhwc
    return suggest_memory_format(t) == torch.channels_last


def is_channels_last(t: torch.Tensor) -> bool:
    """The memory format resconv keeps for a 4-D tensor: True for NHWC (channels_last).

    Contiguous tensors are NCHW (also where both layouts coincide, e.g. C == 1 or H == W == 1);
    a non-contiguous view counts as channels_last when its channel stride is its smallest.
    """
    if t.dim() != 4 or t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.stride(1) <= min(t.stride(2), t.stride(3))


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format
