"""Validation and normalisation of convolution arguments, shared by every backend.

Everything a user passes is checked here, once, before any backend runs, so that every
backend raises the same clear error for the same bad input (the argument's name, what was
expected, what was given). Nothing here touches tensor data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrPair = Union[int, Sequence[int]]


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one 2-D convolution in the field's names.

    Input ``N C H W``, filter ``K (C/groups) R S``, output ``N K P Q``. ``padding`` is
    ``(top, bottom, left, right)`` zero padding (asymmetric for ``'same'`` with even kernels).
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
        return (self.N, self.K, self.P, self.Q)


def conv_out_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(N, K, P, Q) of a conv of x (shape [N, C, H, W]) with weight (shape [K, C/groups, R, S]),
    ``padding`` (top, bottom, left, right): ``P = (H + top + bottom - dilation*(R-1) - 1) // stride + 1``
    (Q alike), as torch.nn.Conv2d's documentation gives it. No checks: see :func:`conv_geometry`."""
    N, _, H, W = x_shape
    K, _, R, S = weight_shape
    P = (H + padding[0] + padding[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + padding[2] + padding[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return (N, K, P, Q)


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got bool {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name}: expected ints, got {value!r}")
        return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
    raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")


def check_tensor(t, name: str, *, dims: Optional[Sequence[int]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        expect = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {expect} tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )


def check_same(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str = "input") -> None:
    """`t` must live on `ref`'s device and have its dtype."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_channel_vector(t: Optional[torch.Tensor], name: str, K: int, device: torch.device) -> None:
    """A per-output-channel vector (bias, scale, shift, BN parameters/statistics): shape [K]."""
    if t is None:
        return
    check_tensor(t, name)
    if tuple(t.shape) != (K,):
        raise ValueError(f"{name}: expected shape ({K},) (one value per output channel), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def resolve_padding(
    padding: Union[str, IntOrPair], kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``padding`` as nn.Conv2d takes it -> ``(top, bottom, left, right)``.

    ``'same'`` follows torch.nn.Conv2d: total ``dilation * (kernel - 1)``, the smaller half
    before, the extra element after (so even kernels pad asymmetrically).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)  # type: ignore[return-value]
        raise ValueError(f"padding: expected an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding: expected non-negative values, got {padding!r}")
    return (ph, ph, pw, pw)


def conv_geometry(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntOrPair,
    padding: Union[str, IntOrPair, Sequence[int]],
    dilation: IntOrPair,
    groups: int,
) -> ConvGeometry:
    """Check a batched conv's arguments and return its geometry.

    ``x`` must be 4-D here (callers unsqueeze unbatched input first); ``padding`` may also
    be an explicit 4-tuple ``(top, bottom, left, right)``.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, a non-int geometry argument.
        ValueError: wrong rank, channel count not matching ``weight``, ``groups`` not
            dividing the channels, non-positive stride or dilation, negative padding, a
            kernel larger than the padded input.
    """
    check_tensor(x, "input", dims=(4,))
    check_tensor(weight, "weight", dims=(4,))
    check_same(weight, x, "weight")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    if C % groups != 0:
        raise ValueError(f"groups: in_channels={C} (input.shape[1]) is not divisible by groups={groups}")
    if K % groups != 0:
        raise ValueError(f"groups: out_channels={K} (weight.shape[0]) is not divisible by groups={groups}")
    if Cg * groups != C:
        raise ValueError(
            f"weight: expected weight.shape[1] == in_channels / groups = {C // groups} for input with "
            f"{C} channels and groups={groups}, got weight of shape {tuple(weight.shape)}"
        )
    if K == 0 or R == 0 or S == 0:
        raise ValueError(f"weight: expected non-empty output channels and kernel, got shape {tuple(weight.shape)}")
    st = _pair(stride, "stride")
    dl = _pair(dilation, "dilation")
    if st[0] < 1 or st[1] < 1:
        raise ValueError(f"stride: expected positive values, got {stride!r}")
    if dl[0] < 1 or dl[1] < 1:
        raise ValueError(f"dilation: expected positive values, got {dilation!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
            raise ValueError(f"padding: expected four non-negative ints, got {padding!r}")
        pad = tuple(padding)
    else:
        pad = resolve_padding(padding, (R, S), st, dl)
    eff_r = dl[0] * (R - 1) + 1
    eff_s = dl[1] * (S - 1) + 1
    hp = H + pad[0] + pad[1]
    wp = W + pad[2] + pad[3]
    if hp < eff_r or wp < eff_s:
        raise ValueError(
            f"input: padded input size ({hp} x {wp}) is smaller than the dilated kernel "
            f"({eff_r} x {eff_s}); the kernel can't be greater than the padded input"
        )
    _, _, P, Q = conv_out_shape(x.shape, weight.shape, st, pad, dl)
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, st, pad, dl, groups)  # type: ignore[arg-type]


def check_residual(residual: Optional[torch.Tensor], x: torch.Tensor, out_shape: Sequence[int]) -> None:
    if residual is None:
        return
    check_tensor(residual, "residual")
    if tuple(residual.shape) != tuple(out_shape):
        raise ValueError(f"residual: expected the output's shape {tuple(out_shape)}, got {tuple(residual.shape)}")
    check_same(residual, x, "residual")


def check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")


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
