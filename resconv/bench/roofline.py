"""The roof: this GPU's limits measured in the same run, and each case's work against them.

* Compute roof: a large matrix product's FLOP/s in each dtype of the run (bf16, fp16, and
  fp32 with TF32, as the convs run), through torch.matmul (cuBLAS).
* Memory roof: a large device-to-device copy's bytes per second, counting bytes read plus
  bytes written.

Per case, FLOPs count the convolution's multiply-adds (2 per MAC; BatchNorm, add and ReLU
are a few FLOPs per element, negligible next to it): fprop ``2*N*K*P*Q*C*R*S``, and in the
backward the same again for wgrad and for dgrad (none for the first layer, whose input
needs no gradient). Compulsory bytes are what the op must move at least once:

* forward: input, filters, residual read; output written;
* backward: incoming gradient, input, filters and one saved activation of the output's size
  (for the ReLU mask / BatchNorm backward; not for the bare conv) read; input, filter and
  residual gradients written.

The roof time is ``max(FLOPs / FLOP/s, bytes / (bytes/s))``; the larger term names the bound,
and ``roof time / measured time`` is the fraction of the roof reached.
"""
from __future__ import annotations

import torch

from .cases import DTYPES, LayerCase
from ..models.layers import ConvLayer
from .timing import TimerConfig, measure


def conv_flops(layer: ConvLayer, batch: int) -> int:
    """FLOPs of one fprop (2 per multiply-add)."""
    return 2 * batch * layer.K * layer.P * layer.Q * layer.C * layer.R * layer.S


def case_work(case: LayerCase, function: str) -> tuple[int, int]:
    """(FLOPs, compulsory bytes) of one call of ``function`` ('fused' or 'conv') in ``case``'s mode."""
    L, N = case.layer, case.batch
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    act_in, act_out, wts = N * L.C * L.H * L.W, N * L.K * L.P * L.Q, L.K * L.C * L.R * L.S
    fused = function == "fused"
    res = act_out if (fused and L.residual) else 0
    fwd_flops = conv_flops(L, N)
    fwd_bytes = act_in + wts + res + act_out
    dx = 0 if L.first else act_in
    bwd_flops = fwd_flops * (2 if not L.first else 1)
    bwd_bytes = act_out + act_in + wts + (act_out if fused else 0) + dx + wts + res
    if case.mode in ("eval", "train-fwd"):
        return fwd_flops, fwd_bytes * e
    if case.mode == "train-bwd":
        return bwd_flops, bwd_bytes * e
    return fwd_flops + bwd_flops, (fwd_bytes + bwd_bytes) * e


def roof(flops: float, nbytes: float, tflops: float, gbps: float) -> tuple[float, str]:
    """(roof time in ms, 'compute' or 'memory')."""
    t_c = flops / (tflops * 1e12) * 1e3
    t_m = nbytes / (gbps * 1e9) * 1e3
    return max(t_c, t_m), ("compute" if t_c >= t_m else "memory")


def measure_peaks(device: torch.device, dtypes, cfg: TimerConfig) -> dict:
    """Measure the matmul FLOP/s (per dtype name in ``dtypes``) and the copy bandwidth.

    Returns:
        dict(matmul_tflops={dtype: TFLOP/s}, matmul_n=n, copy_gbps=GB/s, copy_bytes=bytes moved
        per copy (read + write), timings={...}).
    """
    gpu = device.type == "cuda"
    n = 8192 if gpu else 512
    gen = torch.Generator(device=device).manual_seed(0)
    out = {"matmul_tflops": {}, "matmul_n": n, "timings": {}}
    for name in dtypes:
        dt = DTYPES[name]
        a = [torch.randn(n, n, device=device, dtype=dt, generator=gen) for _ in range(2)]
        b = [torch.randn(n, n, device=device, dtype=dt, generator=gen) for _ in range(2)]
        c = torch.empty(n, n, device=device, dtype=dt)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 convs run in TF32 too
        try:
            t = measure(lambda i: torch.matmul(a[i], b[i], out=c), 2, device, cfg)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out["matmul_tflops"][name] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
        out["timings"][f"matmul_{name}"] = t.as_dict()
    numel = (1 << 28) if gpu else (1 << 24)  # 1 GiB / 64 MiB of float32
    src = [torch.randn(numel, device=device, generator=gen) for _ in range(2)]
    dst = torch.empty(numel, device=device)
    t = measure(lambda i: dst.copy_(src[i]), 2, device, cfg)
    out["copy_bytes"] = 2 * numel * 4
    out["copy_gbps"] = out["copy_bytes"] / (t.median_ms * 1e-3) / 1e9
    out["timings"]["copy"] = t.as_dict()
    # Sanity: the copy really copies (a broken one would make every fraction meaningless).
    dst.copy_(src[1])
    if not torch.equal(dst, src[1]):
        raise RuntimeError("roofline copy check failed: destination differs from source")
    return out
