"""The backend-neutral bottom of the ops layer: what every backend's ops and autograd share.

* :class:`Geometry`: the normalised conv arguments an op takes (stride, padding, dilation, groups).
* :class:`DyPrologue`: the dReLU/dBN prologue, the conv-output gradient given implicitly.
* :func:`bn_input_grad_coefficients`: the BatchNorm input-gradient formula as per-channel
  coefficients; :func:`centred_shift`: beta as the shift of the centred apply.
* :func:`aten_conv2d_backward`: ATen's conv dgrad/wgrad (cuDNN on CUDA), for kernel sets
  without their own.
* :class:`Kernels`: the interface each backend's kernel adapter implements, which the
  autograd of :mod:`resconv.ops.autograd` is written against.

Imports nothing from resconv but ``_conv_args``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .._conv_args import memory_format_of

Tensor = torch.Tensor


class Geometry(NamedTuple):
    """stride (h, w), padding (top, bottom, left, right), dilation (h, w), groups, as lists
    where an op schema takes ``int[]``."""

    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    groups: int

    @classmethod
    def of(cls, stride, padding, dilation, groups) -> "Geometry":
        return cls(list(stride), list(padding), list(dilation), int(groups))


class DyPrologue(NamedTuple):
    """The conv-output gradient given implicitly, from the gradient ``g`` passed as ``dy``:

        dy = a[k] * where(relu_out <= 0, 0, g) + b[k] * (y - mean[k]) + c[k]

    (dReLU and the BatchNorm input-gradient formula; the mask is ``threshold_backward``'s: g
    passes where relu_out is NaN, as torch.relu's gradient does). ``relu_out`` None: no mask; ``y`` None:
    no ``b``/``c``/``mean`` terms. ``a``, ``b``, ``c``, ``mean``: Tensor[K] fp32;
    ``relu_out``, ``y``: Tensor[N, K, P, Q].
    """

    a: Tensor
    relu_out: Optional[Tensor] = None
    y: Optional[Tensor] = None
    b: Optional[Tensor] = None
    c: Optional[Tensor] = None
    mean: Optional[Tensor] = None

    def materialize(self, g: Tensor, dtype: torch.dtype) -> Tensor:
        """dy as a tensor of ``dtype`` (fp32 math, one rounding), for implementations
        without the fused prologue."""
        col = lambda v: v.float().view(1, -1, 1, 1)  # noqa: E731
        gf = g.float()
        if self.relu_out is not None:
            # not `relu_out > 0`: where relu_out is NaN the gradient passes (threshold_backward)
            gf = torch.where(self.relu_out <= 0, torch.zeros((), dtype=gf.dtype, device=gf.device), gf)
        dy = gf * col(self.a)
        if self.y is not None:
            dy = dy + col(self.b) * (self.y.float() - col(self.mean)) + col(self.c)
        return dy.to(dtype)


def bn_input_grad_coefficients(
    sum_g: Tensor, sum_gy: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], count
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of ``dy = a*g + b*(y - mean) + c``, the BatchNorm input gradient
    ``gamma*invstd*(g - mean(g) - xhat*mean(g*xhat))`` with ``xhat = (y - mean)*invstd``
    (``count``: values per channel, a float or a 0-d tensor)."""
    gi = invstd if bn_weight is None else bn_weight.float() * invstd
    return gi, -gi * invstd * invstd * sum_gy / count, -gi * sum_g / count


def empty_batch_statistics(K: int, eps: float, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                           device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, var_unbiased, a, b) of a batch with no values (N*P*Q = 0), each Tensor[K]
    fp32: the identity normalisation, mean 0 and variance 1, never NaN. BatchNorm2d returns an
    empty output for an empty batch and leaves its running statistics untouched; these numbers
    normalise nothing, and the callers skip the running-statistics update."""
    mean = torch.zeros(K, dtype=torch.float32, device=device)
    var = torch.ones(K, dtype=torch.float32, device=device)
    invstd = torch.full((K,), (1.0 + eps) ** -0.5, dtype=torch.float32, device=device)
    a = invstd if bn_weight is None else bn_weight.float() * invstd
    b = torch.zeros_like(mean) if bn_bias is None else bn_bias.float().clone()
    return mean, invstd, var, a, b


def centred_shift(bn_bias: Optional[Tensor], like: Tensor) -> Tensor:
    """beta (Tensor[K]) as the fp32 shift of the centred apply ``(y - mean) * a + beta``
    (zeros like ``like`` without affine)."""
    return torch.zeros_like(like) if bn_bias is None else bn_bias.float()


def ones_per_channel(t: Tensor) -> Tensor:
    """Tensor[K] fp32 of ones for t (Tensor[N, K, ...]): the scale of a plain dReLU."""
    return torch.ones(t.shape[1], dtype=torch.float32, device=t.device)


def dense_like_first(like: Optional[Tensor], grad_out: Tensor, *others: Optional[Tensor]):
    """Incoming gradients can have any strides (even expanded ones): make the gradient dense
    in the layout of the saved forward tensor it is combined with."""
    fmt = memory_format_of(like if like is not None else grad_out)
    grad_out = grad_out.contiguous(memory_format=fmt)
    return (grad_out, *others)


def empty_like_format(shape, like: Tensor, memory_format: torch.memory_format, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


def aten_conv2d_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    *,
    prologue: Optional[DyPrologue] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``conv2d(x, weight) + bias`` given ``dy``, by ATen's ``convolution_backward``.

    Asymmetric padding ('same' with even kernels) is not expressible in ATen's convolution, so
    the input is padded explicitly and the padding cut off the input gradient.

    Args:
        dy (Tensor[N, K, P, Q]): the gradient at the conv output, or with ``prologue`` the
            gradient g it is formed from (materialised first, in x's dtype).
        x (Tensor[N, C, H, W]), weight (Tensor[K, C/groups, R, S]); padding (top, bottom, left, right).
    Returns:
        (grad_input Tensor[N, C, H, W] | None, grad_weight Tensor[K, C/groups, R, S] | None,
        grad_bias Tensor[K] | None), in the dtypes of x, weight and weight.
    """
    if not (need_input or need_weight or need_bias):
        return None, None, None
    if prologue is not None:
        dy = prologue.materialize(dy, x.dtype)
    t, b, l, r = padding
    symmetric = t == b and l == r
    xin = x if symmetric else F.pad(x, (l, r, t, b))
    pad2 = [t, l] if symmetric else [0, 0]
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        dy, xin, weight, [weight.shape[0]] if need_bias else None,
        list(stride), pad2, list(dilation), False, [0, 0], groups,
        [need_input, need_weight, need_bias],
    )
    if need_input and not symmetric:
        gx = gx[:, :, t : t + x.shape[2], l : l + x.shape[3]]
    return (gx if need_input else None, gw if need_weight else None, gb if need_bias else None)


class Kernels:
    """The kernels one backend brings, behind one interface (each backend's adapter subclasses
    it): the autograd of :mod:`resconv.ops.autograd` and the synchronized statistics are
    written once against these methods. Tensors are 4-D ``[N, K, P, Q]`` unless said;
    per-channel vectors are Tensor[K] fp32; ``geom`` is a :class:`Geometry`.

    Attributes:
        name (str): the backend's name.
        fused_conv_backward (bool): whether :meth:`conv_backward` forms dy from a
            :class:`DyPrologue` inside its own dgrad/wgrad loads (True) or materialises it and
            runs ATen's (False). A plain attribute, set once by the backend.
    """

    name = "?"
    fused_conv_backward = False

    # -- registered ops (traceable by torch.compile): used by autograd and the backends --
    def fprop(self, x, weight, scale, shift, residual, geom: Geometry, relu: bool, allow_tf32: bool,
              out_format: torch.memory_format) -> Tensor:
        """``act(scale * conv2d(x, W) + shift + residual)`` (the eval-path op)."""
        raise NotImplementedError

    def bn_train(self, x, weight, bias, bn_weight, bn_bias, residual, geom: Geometry, eps: float, relu: bool,
                 allow_tf32: bool, out_format: torch.memory_format):
        """The training-path op: (out, y, mean, invstd, var_unbiased)."""
        raise NotImplementedError

    def add_relu(self, x, residual, relu: bool) -> Tensor:
        raise NotImplementedError

    def update_running_stats_(self, running_mean, running_var, mean, var_unbiased, momentum: float) -> None:
        """``running = (1 - momentum) * running + momentum * batch`` in place (either may be None)."""
        raise NotImplementedError

    def bn_backward_reduce(self, grad_out, out, y, mean, relu: bool, want_g: bool):
        """(sum(g), sum(g * (y - mean)), g or None) with ``g = threshold_backward(grad_out, out, 0)``
        (the ReLU gradient: zero where out <= 0, grad_out elsewhere, NaN out included) when relu;
        the second is zeros without ``y``; g is written (in grad_out's strides) only with ``want_g``."""
        raise NotImplementedError

    def bn_backward_dy(self, grad_out, out, y, a, b, c, mean, relu: bool, want_grad_residual: bool,
                       dy_dtype: torch.dtype):
        """(dy, grad_residual or None): dReLU + dBN input formula in one pass."""
        raise NotImplementedError

    def conv_backward(self, dy, x, weight, geom: Geometry, need_input: bool, need_weight: bool, need_bias: bool,
                      allow_tf32: bool, prologue: Optional[DyPrologue]):
        """(grad_input | None, grad_weight | None, grad_bias | None) of the conv given dy
        (formed from ``prologue`` when there is one): the backend's own dgrad/wgrad with the
        prologue fused into their loads when ``fused_conv_backward``, else dy materialised by
        :meth:`bn_backward_dy` and ATen's conv backward (which follows cudnn.allow_tf32)."""
        if not (need_input or need_weight or need_bias):
            return None, None, None
        if self.fused_conv_backward:
            return self.own_conv_backward(dy, x, weight, geom, need_input, need_weight, need_bias, allow_tf32,
                                          prologue)
        if prologue is not None:
            p = prologue
            dy, _ = self.bn_backward_dy(dy, p.relu_out, p.y, p.a, p.b, p.c, p.mean, p.relu_out is not None, False,
                                        x.dtype)
        return aten_conv2d_backward(dy, x, weight, *geom, need_input, need_weight, need_bias)

    def own_conv_backward(self, dy, x, weight, geom: Geometry, need_input: bool, need_weight: bool,
                          need_bias: bool, allow_tf32: bool, prologue: Optional[DyPrologue]):
        """The backend's dgrad/wgrad, with the prologue formed in their operand loads."""
        raise NotImplementedError(f"the {self.name} kernels have no conv backward of their own")

    # -- launchers (called inside op bodies and by the synchronized statistics) --
    def fprop_stats(self, x, weight, bias, geom: Geometry, allow_tf32: bool, out_format: torch.memory_format):
        """(y = conv2d(x, W) + bias, count Tensor[T], mean Tensor[T, K], m2 Tensor[T, K]):
        the conv with per-tile statistics partials of y from the fp32 accumulator."""
        raise NotImplementedError

    def bn_finalize(self, count, mean, m2, bn_weight, bn_bias, eps: float):
        """(mean, invstd, var_unbiased, a, b), each Tensor[K] fp32, from partial moments
        merged with Chan's formula in a fixed order."""
        raise NotImplementedError

    def scale_shift_act(self, y, a, b, center, residual, relu: bool) -> Tensor:
        """``act((y - center) * a + b + residual)`` in y's dtype and layout."""
        raise NotImplementedError
