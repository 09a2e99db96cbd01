"""Plain-PyTorch definition of every resconv op: the specification and the "torch" backend.

Every backend is tested against these functions, and these functions are tested against
torch.nn (Conv2d, BatchNorm2d, ReLU). They run on any device and in float64.

Arguments are the normalised ones the ops take (see ``resconv.functional`` for the public
API, which validates and normalises): ``x`` is 4-D, ``padding`` is
``(top, bottom, left, right)`` zero padding, ``stride``/``dilation`` are pairs.

Precision rule (the one the kernels follow): the convolution accumulates in float32
(float64 for float64 input, complex64/complex128 for complex input); the whole epilogue
(scale/shift, BatchNorm, residual, ReLU) is computed in that precision and the result is
rounded once to the input dtype. fp16/bf16 operands are exactly representable in float32, so
upcasting them changes nothing but the accumulator. On CUDA, float32 follows
``torch.backends.cudnn.allow_tf32`` like nn.Conv2d.

Outputs take the memory format torch.nn.functional.conv2d gives for the same input and
weight (:func:`resconv._conv_args.conv_memory_format`). With no input channels (C == 0) the
output has no channels either, as torch's (``Tensor[N, 0, P, Q]``); per-channel parameters
then get zero gradients and the running statistics stay as they are.

For float32 and float64 input the accumulation dtype is the input's and there is no
intermediate rounding to avoid, so the same computation runs as ATen's fused composites
(conv with bias, ``F.batch_norm``): the rule holds, and the "torch" backend (what ``auto``
picks on a CPU) costs no more than the torch.nn modules it replaces.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._conv_args import conv_memory_format, memory_format_of

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / epilogue dtype for an input dtype: float64 and complex64/complex128 stay,
    complex32 uses complex64, the rest float32."""
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        return dtype
    return torch.complex64 if dtype == torch.complex32 else torch.float32


def conv_acc(
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """conv2d(x, weight) without bias, in the accumulation dtype.

    Args:
        x (Tensor[N, C, H, W]): input.
        weight (Tensor[K, C/groups, R, S]): filters.
        stride ((int, int)): positive.
        padding ((int, int, int, int)): (top, bottom, left, right) zero padding.
        dilation ((int, int)): positive.
        groups (int): divides C and K.
    Returns:
        Tensor[N, K, P, Q] (Tensor[N, 0, P, Q] when C == 0) in :func:`acc_dtype` of x's dtype.
    """
    dt = acc_dtype(x.dtype)
    xc, wc = x.to(dt), weight.to(dt)
    t, b, l, r = padding
    if t == b and l == r:
        return F.conv2d(xc, wc, None, tuple(stride), (t, l), tuple(dilation), groups)
    return F.conv2d(F.pad(xc, (l, r, t, b)), wc, None, tuple(stride), 0, tuple(dilation), groups)


def _native(x: Tensor, *vectors: Optional[Tensor]) -> bool:
    """Whether ATen's composites compute exactly the rule: float32/float64 input and every
    per-channel vector in that dtype (so nothing is rounded between the steps)."""
    return x.dtype in (torch.float32, torch.float64) and all(v is None or v.dtype == x.dtype for v in vectors)


def folds_scale(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> bool:
    """Whether :func:`conv2d` computes ``conv2d(x, weight * scale) + shift`` (ATen's conv with
    the scale folded into the filters, as ``torch.ao.nn.intrinsic`` folds eval BatchNorm): for
    float32/float64 x with scale and shift in x's dtype. A caller that keeps ``weight * scale``
    may then pass it with ``scale=None`` and get the same numbers without the per-call fold."""
    return _native(x, scale, shift)


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups) -> Tensor:
    """F.conv2d with (top, bottom, left, right) padding, in x's dtype."""
    t, b, l, r = padding
    if t == b and l == r:
        return F.conv2d(x, weight, bias, tuple(stride), (t, l), tuple(dilation), groups)
    return F.conv2d(F.pad(x, (l, r, t, b)), weight, bias, tuple(stride), 0, tuple(dilation), groups)


def _epilogue(y: Tensor, residual: Optional[Tensor], relu: bool, dtype: torch.dtype,
              memory_format: torch.memory_format, owned: bool = False) -> Tensor:
    """Residual, ReLU, one rounding to ``dtype``, in ``memory_format``.
    ``owned``: y is this function's own intermediate (no caller's tensor, not saved for
    backward), so the add and the ReLU may overwrite it, as torch.nn's ResNet blocks do."""
    if residual is not None:
        y = y.add_(residual.to(y.dtype)) if owned else y + residual.to(y.dtype)
    if relu:
        y = torch.relu_(y) if owned else torch.relu(y)
    return y.to(dtype).contiguous(memory_format=memory_format)


def _channel(v: Tensor, y: Tensor) -> Tensor:
    """Per-channel v (Tensor[K]) to broadcast over y (Tensor[N, K, P, Q]) in y's dtype. A
    y without channels (C == 0) takes none of v: v still gets its (zero) gradient."""
    v = v.to(y.dtype)
    return (v if y.shape[1] == v.shape[0] else v[: y.shape[1]]).view(1, -1, 1, 1)


def conv2d(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    relu: bool = False,
) -> Tensor:
    """Fused convolution: ``out = act(scale * conv2d(x, W) + shift + residual)``.

    Conv bias and eval-mode BatchNorm are folded into the per-channel ``scale`` / ``shift``
    by the caller (:func:`bn_fold`); ``act`` is ReLU when ``relu`` else identity.

    Args:
        x (Tensor[N, C, H, W]): input, fp16/bf16/fp32/fp64, any memory format.
        weight (Tensor[K, C/groups, R, S]): filters, x's dtype.
        scale (Tensor[K] or None): per-output-channel scale, any float dtype.
        shift (Tensor[K] or None): per-output-channel shift, any float dtype.
        residual (Tensor[N, K, P, Q] or None): added before the activation.
        stride ((int, int)): as in :func:`conv_acc`.
        padding ((int, int, int, int)): as in :func:`conv_acc`.
        dilation ((int, int)): as in :func:`conv_acc`.
        groups (int): as in :func:`conv_acc`.
        relu (bool): apply ReLU last.
    Returns:
        Tensor[N, K, P, Q] in x's dtype and :func:`~resconv._conv_args.conv_memory_format`.
    """
    if folds_scale(x, scale, shift):  # fold the scale into the filters: one conv with bias
        w = weight if scale is None else weight * scale.view(-1, 1, 1, 1)
        y = _conv(x, w, shift, stride, padding, dilation, groups)
        return _epilogue(y, residual, relu, x.dtype, conv_memory_format(x, weight), owned=True)
    y = conv_acc(x, weight, stride, padding, dilation, groups)
    if scale is not None:
        y = y * _channel(scale, y)
    if shift is not None:
        y = y + _channel(shift, y)
    return _epilogue(y, residual, relu, x.dtype, conv_memory_format(x, weight))


def add_relu(x: Tensor, residual: Tensor, relu: bool = True) -> Tensor:
    """``out = act(x + residual)`` computed in :func:`acc_dtype`, rounded once, in x's memory format."""
    dt = acc_dtype(x.dtype)
    return _epilogue(x.to(dt), residual, relu, x.dtype, memory_format_of(x))


def bn_fold(
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm folded into a per-channel epilogue.

    ``BN(conv + b) = scale * conv + shift`` with ``scale = gamma / sqrt(var + eps)`` and
    ``shift = beta + (b - mean) * scale`` (torch.nn.BatchNorm2d's formula rearranged).
    Differentiable; computed in the widest dtype of the arguments, at least float32 (float64
    stays float64).

    Returns:
        (scale, shift), each Tensor[K].
    """
    dt = torch.float32
    for t in (bias, bn_weight, bn_bias, running_mean, running_var):
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    scale = torch.rsqrt(running_var.to(dt) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dt)
    centred = -running_mean.to(dt) if bias is None else bias.to(dt) - running_mean.to(dt)
    shift = centred * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dt)
    return scale, shift


def combine_moments(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Combine partial moments (count, mean, M2) along dim 0 with Chan et al.'s formula.

    Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample
    variances" (1979): ``n = na + nb``, ``d = mean_b - mean_a``,
    ``mean = mean_a + d * nb / n``, ``M2 = M2a + M2b + d^2 * na * nb / n``.

    Args:
        count (Tensor[T]): values per partial.
        mean (Tensor[T, K]): each partial's mean.
        m2 (Tensor[T, K]): each partial's sum of squared deviations from its mean.
    Returns:
        (count: Tensor[], mean: Tensor[K], m2: Tensor[K]).
    """
    n = count.sum()
    mu = (count[:, None] * mean).sum(0) / n
    m2_total = m2.sum(0) + (count[:, None] * (mean - mu) ** 2).sum(0)
    return n, mu, m2_total


def batch_moments(y: Tensor, process_group=None) -> tuple[Tensor, Tensor, int]:
    """Per-channel batch mean and biased variance of y (Tensor[N, K, P, Q]), optionally over
    all ranks of ``process_group`` (differentiable all-gather of (count, mean, M2))."""
    n_local = y.shape[0] * y.shape[2] * y.shape[3]
    if n_local == 0 or y.shape[1] == 0:  # an empty batch (or no channels) has no statistics; its output needs none
        zeros = y.new_zeros(y.shape[1]) + y.sum((0, 2, 3))  # keeps the graph: gradients are zeros
        mean, var = zeros, zeros + 1.0
    else:
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    if process_group is None:
        return mean, var, n_local
    import torch.distributed.nn.functional as dist_nn

    m2 = var * n_local
    count = torch.tensor([float(n_local)], dtype=y.dtype, device=y.device)
    counts = torch.cat(dist_nn.all_gather(count, group=process_group))
    means = torch.stack(dist_nn.all_gather(mean, group=process_group))
    m2s = torch.stack(dist_nn.all_gather(m2, group=process_group))
    n, mu, m2_total = combine_moments(counts, means, m2s)
    return mu, m2_total / n, int(n.item())


def y_numel_positive(x: Tensor, weight: Tensor) -> bool:
    """Whether the conv output has values per channel (an empty batch has no statistics)."""
    return x.shape[0] > 0 and weight.shape[0] > 0


@torch.no_grad()
def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """torch.nn.BatchNorm2d's running-statistics update, in place:
    ``running = (1 - momentum) * running + momentum * batch``, the variance unbiased
    (``var * n / (n - 1)``)."""
    if running_mean is not None:
        new = running_mean.to(mean.dtype) * (1.0 - momentum) + mean * momentum
        running_mean.copy_(new)
    if running_var is not None:
        unbiased = var * (count / max(count - 1, 1))
        new = running_var.to(var.dtype) * (1.0 - momentum) + unbiased * momentum
        running_var.copy_(new)


def conv_bn2d_train(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    residual: Optional[Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    relu: bool = False,
    process_group=None,
) -> Tensor:
    """Training-mode ``act(BN_batch(conv2d(x, W) + b) + residual)``.

    BatchNorm uses the batch statistics (biased variance for normalising) and updates
    ``running_mean``/``running_var`` in place (unbiased variance) exactly as
    torch.nn.BatchNorm2d does, when they are given (an empty batch leaves them untouched).

    Args:
        x (Tensor[N, C, H, W]): input.
        weight (Tensor[K, C/groups, R, S]): filters.
        bias (Tensor[K] or None): the conv's bias.
        bn_weight (Tensor[K] or None): gamma.
        bn_bias (Tensor[K] or None): beta.
        running_mean (Tensor[K] or None): updated in place.
        running_var (Tensor[K] or None): updated in place (unbiased variance).
        momentum (float): of the running-statistics update.
        eps (float): added to the variance.
        residual (Tensor[N, K, P, Q] or None): added after BatchNorm.
        stride ((int, int)): as in :func:`conv_acc`.
        padding ((int, int, int, int)): as in :func:`conv_acc`.
        dilation ((int, int)): as in :func:`conv_acc`.
        groups (int): as in :func:`conv_acc`.
        relu (bool): apply ReLU last.
        process_group (torch.distributed.ProcessGroup or None): synchronise the statistics.
    Returns:
        Tensor[N, K, P, Q] in x's dtype.
    """
    if process_group is None and y_numel_positive(x, weight) and x.shape[1] > 0 and (running_mean is None) == (running_var is None) \
            and _native(x, bias, bn_weight, bn_bias, running_mean, running_var):
        # torch.nn.BatchNorm2d's own kernels: its cost and its accuracy (on a CPU, ATen's
        # channels_last apply folds the mean into the shift, y * a + (beta - mean * a), which
        # loses log2(|mean| / std) bits of the output in float32, as torch.nn does; the
        # statistics are exact either way: docs/numerics.md)
        y = _conv(x, weight, bias, stride, padding, dilation, groups)
        z = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
        return _epilogue(z, residual, relu, x.dtype, conv_memory_format(x, weight), owned=True)
    y = conv_acc(x, weight, stride, padding, dilation, groups)
    if bias is not None:
        y = y + _channel(bias, y)
    mean, var, count = batch_moments(y, process_group)
    # an empty batch, or one without channels (C == 0), leaves the running statistics untouched, as torch
    if count > 0 and y.shape[1] == weight.shape[0]:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    invstd = torch.rsqrt(var + eps)
    z = (y - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    if bn_weight is not None:
        z = z * _channel(bn_weight, z)
    if bn_bias is not None:
        z = z + _channel(bn_bias, z)
    return _epilogue(z, residual, relu, x.dtype, conv_memory_format(x, weight))
