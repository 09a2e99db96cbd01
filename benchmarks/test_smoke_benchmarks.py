"""pytest-benchmark timings of the small CPU smoke cases (not part of the test suite).

    pytest benchmarks/ --benchmark-only            # timings, with pytest-benchmark's statistics
    pytest benchmarks/ --benchmark-autosave        # keep them under .benchmarks/ to compare later

Same cases, providers and output check as ``resconv bench --preset smoke``
(resconv.bench): each provider's output is compared with the float32 reference first, and a
provider that fails the check fails its test instead of being timed. On the CPU only (the
timer is the host clock); resconv-triton runs in Triton's interpreter when
TRITON_INTERPRET=1 (set by benchmarks/conftest.py without a GPU), few rounds since it is slow.
For GPU numbers use ``resconv bench`` (CUDA events) or benchmarks/run_gpu.sh.
"""
from __future__ import annotations

import pytest
import torch

from resconv.bench.cases import LayerCase, grad_names, make_set, reference
from resconv.bench.check import compare
from resconv.bench.providers import PROVIDERS
from resconv.bench.shapes import smoke_layers

CPU = torch.device("cpu")
PROVIDER_NAMES = ["eager", "bare-conv", "resconv-torch", "resconv-triton"]
CASES = [LayerCase(lay, 2, mode, "fp32", "channels_last")
         for lay in smoke_layers() for mode in ("eval", "train-fwdbwd")]


@pytest.mark.parametrize("provider", PROVIDER_NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-{c.layer.name}")
def test_smoke_case(benchmark, case, provider):
    p = PROVIDERS[provider]
    why = p.unavailable(case, CPU)
    if why is not None:
        pytest.skip(why)
    s = make_set(case, CPU, torch.Generator().manual_seed(0))
    ref_out, ref_grads = reference(case, s, p.function)
    ctx = torch.inference_mode if case.mode == "eval" else torch.enable_grad
    with ctx():
        call = p.prepare(case, [s])
        out, grads = call(0)
        verdict = compare(out, grads, ref_out, ref_grads, grad_names(case, p.function), case.torch_dtype)
        assert verdict.ok, f"{provider}: {verdict.worst} error {verdict.err:.3g} > {verdict.tol:.3g}"
        if provider == "resconv-triton":  # the interpreter takes up to a second a call
            benchmark.pedantic(call, args=(0,), rounds=3, iterations=1)
        else:
            benchmark(call, 0)
