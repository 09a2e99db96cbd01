"""The static performance model of ``resconv inspect``: kernel times on an H200 *estimated
from machine code*, never measured, next to the roofline lower bound.

Machine (NVIDIA H200 SXM; shared/ANCHORS.md "Numbers" and the H100/H200 datasheets):
132 SMs; dense bf16/fp16 tensor-core peak 989 TFLOP/s (TF32 half of it; plain fp32
67 TFLOP/s); HBM 4.8 TB/s on the datasheet, about 4.3 TB/s reached by a device copy (used
here). Per SM: 4 warp schedulers issuing one instruction per cycle each, 64 K registers,
228 KB of shared memory (227 KB per block), 64 warps, 32 blocks. The clock the model counts
cycles in is the one at which 132 SMs give 989 TFLOP/s at 4096 dense bf16 FLOP per cycle per
SM: 1.83 GHz (the absolute clock cancels out of every ratio below).

The model, per kernel launch and candidate configuration (tile BM x BN x BK, W warps):

* Issue-rate model of a matrix kernel's main loop (one BK step per iteration):
  tensor-core cycles ``c_mma = 2 BM BN BK / (4096 r)`` (``r`` the dtype's rate against bf16:
  1 for bf16/fp16, 1/2 for TF32) against issue cycles ``c_issue = W n / 4`` (``n`` the
  loop's SASS instructions, every warp issuing all of them, spread over the 4 schedulers).
  One iteration costs ``max(c_mma / cap, c_issue)`` where ``cap`` is the fraction of peak the
  tensor-core instruction can reach at best: 0.78 for wgmma (HGMMA; a large bf16 matmul
  reaches 790 of 989 TFLOP/s, shared/ANCHORS.md), 0.6 for mma.sync (HMMA; an assumption), and
  a matrix loop without tensor-core instructions runs at the plain fp32 rate.
* A program runs its K loop ``trips`` times (from the launch's arguments) and the rest of its
  code once (prologue, epilogue): ``W (n_total - n) / 4`` more issue cycles. With one program
  resident per SM it costs ``trips * iteration + rest``; with two or more, one program's
  prologue and epilogue issue while another's tensor-core instructions run, so it costs
  ``max(trips * c_mma / cap, trips * c_issue + rest)``. Programs share an SM's tensor cores
  and schedulers, so an SM runs its ``ceil(programs / 132)`` programs one after the other:
  ``t_compute = ceil(programs / 132) * program / clock``. The idle SMs of the last wave are
  the *wave efficiency*, ``programs / (132 ceil(programs / 132))``.
* Reductions and elementwise kernels (no tensor cores): issue time of all their programs
  over the 132 x 4 schedulers; and, when the whole grid fits in one wave and the program
  loops, the chain of its iterations, each paying its own issue cycles plus, if the loop
  loads with plain (synchronous) loads, one dependent global-memory round trip, assumed
  0.5 us (not calibrated).
* Memory: the launch's compulsory bytes (each tensor it reads or writes once) at 4.3 TB/s.
* Estimated time ``max(t_compute, t_memory)``; the autotuner is assumed to pick the
  candidate configuration with the smallest estimate.
* The roofline lower bound of a layer is ``max(FLOPs / 989 TFLOP/s, compulsory bytes /
  4.3 TB/s)`` (FLOPs and bytes as :mod:`resconv.bench.roofline` counts them).

What the model leaves out: latency that pipelining and occupancy fail to hide (it assumes
they hide it, except in the one-wave loops above), L2 and shared-memory bandwidth, bank
conflicts, launch overhead (CUDA graphs), clock changes under power limits. Nothing in it is
calibrated against a measurement: no GPU was available. A GPU run (``benchmarks/run_gpu.sh``)
replaces these numbers; the model only orders things.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Machine:
    name: str = "NVIDIA H200 SXM (datasheet numbers; bandwidth as reached by a copy)"
    sms: int = 132
    peak_tflops: float = 989.0  # dense bf16/fp16 tensor cores
    fp32_tflops: float = 67.0  # plain fp32 (FFMA)
    hbm_tbps: float = 4.3  # reached by a device copy (4.8 on the datasheet)
    hbm_tbps_datasheet: float = 4.8
    flop_per_cycle_per_sm: int = 4096  # dense bf16
    schedulers: int = 4
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472  # 228 KB
    shared_per_block: int = 232448  # 227 KB
    shared_reserved_per_block: int = 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    wgmma_cap: float = 0.78
    mma_sync_cap: float = 0.6
    dram_round_trip_s: float = 0.5e-6

    @property
    def clock_hz(self) -> float:
        return self.peak_tflops * 1e12 / (self.flop_per_cycle_per_sm * self.sms)

    def as_dict(self) -> dict:
        return dict(asdict(self), clock_ghz=self.clock_hz / 1e9)


H200 = Machine()

# Tensor-core rate against bf16 per operand dtype ('tf32': fp32 operands on TF32 units).
MMA_RATE = {"bfloat16": 1.0, "float16": 1.0, "tf32": 0.5}


def occupancy(m: Machine, registers: int, shared: int, warps: int) -> int:
    """Blocks per SM that fit (registers are allocated per warp in units of 256)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = m.registers_per_sm // (regs_per_warp * warps)
    by_smem = m.shared_per_sm // (shared + m.shared_reserved_per_block) if shared else m.max_blocks_per_sm
    return max(0, min(m.max_blocks_per_sm, m.max_warps_per_sm // warps, by_regs, by_smem))


def wave_efficiency(m: Machine, programs: int) -> float:
    if programs <= 0:
        return 1.0
    return programs / (m.sms * math.ceil(programs / m.sms))


def matrix_kernel(m: Machine, *, tile: tuple, warps: int, loop_instructions: int, total_instructions: int,
                  trips: float, programs: int, blocks_per_sm: int, mma: str, operand: str, useful_flops: float,
                  nbytes: float) -> dict:
    """Estimate of a matrix kernel (see the module docstring). ``tile`` = (BM, BN, BK);
    ``mma`` the tensor-core instruction ('HGMMA', 'HMMA' or 'none'); ``operand`` the dtype
    name ('bfloat16', 'float16', 'tf32' or 'float32'); ``blocks_per_sm`` its occupancy."""
    bm, bn, bk = tile
    clock = m.clock_hz
    tile_flops = 2.0 * bm * bn * bk
    if mma == "none" or operand not in MMA_RATE:
        c_mma = tile_flops / (m.fp32_tflops * 1e12 / (m.sms * clock))
        cap = 1.0
    else:
        c_mma = tile_flops / (m.flop_per_cycle_per_sm * MMA_RATE[operand])
        cap = m.wgmma_cap if mma == "HGMMA" else m.mma_sync_cap
    c_issue = warps * loop_instructions / m.schedulers
    iteration = max(c_mma / cap, c_issue)
    rest = warps * max(total_instructions - loop_instructions, 0) / m.schedulers
    if blocks_per_sm >= 2:
        program = max(trips * c_mma / cap, trips * c_issue + rest)
    else:
        program = trips * iteration + rest
    t_compute = math.ceil(programs / m.sms) * program / clock
    t_memory = nbytes / (m.hbm_tbps * 1e12)
    t = max(t_compute, t_memory)
    return dict(
        time_s=t, compute_s=t_compute, memory_s=t_memory, bound="memory" if t_memory >= t_compute else "compute",
        mma_cycles=c_mma, issue_cycles=c_issue, loop_efficiency=min(1.0, c_mma / iteration) if iteration else 0.0,
        wave_efficiency=wave_efficiency(m, programs),
        fraction_of_peak=useful_flops / (t * m.peak_tflops * 1e12) if t > 0 else 0.0,
    )


def plain_kernel(m: Machine, *, warps: int, loop_instructions: int, total_instructions: int, trips: float,
                 programs: int, blocks_per_sm: int, sync_loads_in_loop: bool, nbytes: float) -> dict:
    """Estimate of a kernel without tensor cores (reductions, elementwise passes)."""
    clock = m.clock_hz
    per_program = trips * loop_instructions + max(total_instructions - loop_instructions, 0)
    t_issue = programs * per_program * warps / (m.schedulers * m.sms) / clock
    t_chain = 0.0
    if trips > 1 and programs <= m.sms * max(blocks_per_sm, 1):
        latency = m.dram_round_trip_s * clock if sync_loads_in_loop else 0.0
        t_chain = trips * (loop_instructions * math.ceil(warps / m.schedulers) + latency) / clock
    t_memory = nbytes / (m.hbm_tbps * 1e12)
    t = max(t_issue, t_chain, t_memory)
    bound = "memory" if t == t_memory else ("latency chain" if t == t_chain else "issue")
    return dict(time_s=t, compute_s=max(t_issue, t_chain), memory_s=t_memory, bound=bound,
                wave_efficiency=wave_efficiency(m, programs), issue_s=t_issue, chain_s=t_chain)


def roofline(m: Machine, flops: float, nbytes: float) -> dict:
    """Lower bound: max(FLOPs at the tensor-core peak, compulsory bytes at the reached bandwidth)."""
    t_c = flops / (m.peak_tflops * 1e12)
    t_m = nbytes / (m.hbm_tbps * 1e12)
    return dict(time_s=max(t_c, t_m), compute_s=t_c, memory_s=t_m, bound="compute" if t_c >= t_m else "memory")
