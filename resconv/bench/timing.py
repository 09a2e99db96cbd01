"""Timing: per-call CUDA events on a GPU, ``time.perf_counter`` on a CPU.

``measure(call, n_sets, ...)`` times ``call(i)`` with ``i`` cycling over the input sets
(so that consecutive calls read different memory and a working set larger than L2 is not
timed from cache). Warm-up calls run first, outside the timed region (compilation,
autotuning and cuDNN's algorithm search happen in the caller's first call, which is timed
separately as setup). The number of timed calls is chosen from the warm-up so that they
fill ``rep_ms``; each call is timed on its own (an event pair around it), so the result is a
distribution: median, p20 and p80.

Per-call events, without flushing L2 between calls: when the host cannot issue work as fast
as the GPU finishes it (small layers, many launches), the gap shows in the time, as it does
for a user. CUDA-graph providers are how the suite shows what launch overhead costs.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TimerConfig:
    warmup_ms: float = 10.0  # warm-up time before timing (at least min_warmup_calls calls)
    rep_ms: float = 40.0  # time to fill with timed calls
    min_reps: int = 10
    max_reps: int = 1000
    min_warmup_calls: int = 2


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    reps: int
    clock: str  # 'cuda-events' or 'perf_counter'

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending list."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: list[float], clock: str) -> Timing:
    s = sorted(times_ms)
    return Timing(
        median_ms=percentile(s, 50), p20_ms=percentile(s, 20), p80_ms=percentile(s, 80), min_ms=s[0],
        mean_ms=sum(s) / len(s), reps=len(s), clock=clock,
    )


class Stopwatch:
    """Wall time of a block including the device work it queued (synchronizes on exit)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


def measure(call: Callable[[int], object], n_sets: int, device: torch.device, cfg: TimerConfig) -> Timing:
    """Time ``call(i)``, ``i`` cycling over ``range(n_sets)``; see the module docstring."""
    if n_sets < 1:
        raise ValueError(f"n_sets: expected >= 1, got {n_sets}")
    # Warm-up, and an estimate of one call's time to size the timed run (min_warmup_calls=0
    # skips both: min_reps calls are timed, e.g. for the interpreter's smoke run).
    reps = cfg.min_reps
    if cfg.min_warmup_calls > 0:
        calls = 0
        synchronize(device)
        t0 = time.perf_counter()
        while True:
            call(calls % n_sets)
            calls += 1
            if calls >= cfg.min_warmup_calls:
                synchronize(device)
                elapsed = time.perf_counter() - t0
                if elapsed * 1e3 >= cfg.warmup_ms:
                    break
        per_call_ms = max(elapsed * 1e3 / calls, 1e-4)
        reps = int(min(cfg.max_reps, max(cfg.min_reps, math.ceil(cfg.rep_ms / per_call_ms))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            starts[r].record()
            call(r % n_sets)
            ends[r].record()
        torch.cuda.synchronize(device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")
    times = []
    for r in range(reps):
        t = time.perf_counter()
        call(r % n_sets)
        times.append((time.perf_counter() - t) * 1e3)
    return summarize(times, "perf_counter")
