"""What each resconv Triton kernel does for one launch, for the estimate model
(:mod:`resconv.bench.estimate`): its main-loop trips per program, the FLOPs it must do and the
compulsory bytes it moves (each tensor it reads or writes once).

Written from the kernels' code (``triton_kernels/``): keep in step with them. A kernel without
an entry here is reported with its machine-code facts and no estimate.
"""
from __future__ import annotations

import math

from .aot import TensorSpec


def _nbytes(named: dict, *names: str) -> int:
    return sum(named[n].nbytes for n in names if isinstance(named.get(n), TensorSpec))


def _elem(named: dict, name: str) -> int:
    return TensorSpec((1,), (1,), named[name].dtype).nbytes


def _operand(named: dict, tensor: str) -> str:
    dt = named[tensor].dtype
    if dt == "float32":
        return "tf32" if named.get("PRECISION") == "tf32" else "float32"
    return dt


def _taps_per_phase(size_taps: int, stride: int, dil: int) -> float:
    """Mean number of filter taps per stride phase of one axis (dgrad's phase split)."""
    counts = [0] * stride
    for r in range(size_taps):
        counts[(r * dil) % stride] += 1
    return sum(counts) / stride


def fprop(named: dict) -> dict:
    M, Kg, Cg, R, S = (named[k] for k in ("M", "Kg", "Cg", "R", "S"))
    groups = named["K"] // Kg
    bk = named["BLOCK_K"]
    if named.get("FLAT_K"):
        trips = math.ceil(Cg * R * S / bk)
    else:
        trips = R * S * math.ceil(Cg / bk)
    reads = ["x_ptr", "w_ptr"] + (["res_ptr"] if named.get("HAS_RES") else [])
    writes = ["out_ptr"] + (["cnt_ptr", "mean_ptr", "m2_ptr"] if named.get("STATS") else [])
    return dict(matrix=True, trips=trips, flops=2.0 * M * Kg * groups * Cg * R * S, operand=_operand(named, "x_ptr"),
                nbytes=_nbytes(named, *reads, *writes))


def pack_input(named: dict) -> dict:
    return dict(matrix=False, trips=1, nbytes=_nbytes(named, "x_ptr", "xp_ptr"))


def dgrad(named: dict) -> dict:
    Kg, Cg, R, S = (named[k] for k in ("Kg", "Cg", "R", "S"))
    sh, sw, dh, dw = (named[k] for k in ("stride_h", "stride_w", "dil_h", "dil_w"))
    taps = _taps_per_phase(R, sh, dh) * _taps_per_phase(S, sw, dw)
    bk = named["BLOCK_K"]
    trips = math.ceil(taps * Kg / bk) if named.get("FLAT_K") else taps * math.ceil(Kg / bk)
    N, P, Q = (named[k] for k in ("N", "P", "Q"))
    groups = named["dx_ptr"].shape[1] // Cg
    return dict(matrix=True, trips=trips, flops=2.0 * N * P * Q * Kg * groups * Cg * R * S,
                operand=_operand(named, "w_ptr"), nbytes=_nbytes(named, "dy_ptr", "w_ptr", "dx_ptr"))


def wgrad(named: dict) -> dict:
    Cg, R, S, K = (named[k] for k in ("Cg", "R", "S", "K"))
    split = named["_grid"][2]
    trips = math.ceil(math.ceil(named["NPQ"] / split) / named["BLOCK_K"])
    if named["DIRECT"]:
        written = _nbytes(named, "gw_ptr") + (_nbytes(named, "gb_ptr") if named.get("HAS_BIAS") else 0)
    else:
        written = split * K * (R * S * Cg + bool(named.get("HAS_BIAS"))) * 4
    return dict(matrix=True, trips=trips, flops=2.0 * named["NPQ"] * K * Cg * R * S, operand=_operand(named, "x_ptr"),
                nbytes=_nbytes(named, "dy_ptr", "x_ptr") + written)


def split_reduce(named: dict) -> dict:
    L = named["L"]
    return dict(matrix=False, trips=1, nbytes=named["SPLIT"] * L * 4 + L * _elem(named, "out_ptr"))


def chan_merge(named: dict) -> dict:
    T, K = named["T"], named["K"]
    T2 = named["_grid"][0]
    return dict(matrix=False, trips=1, nbytes=(T + T2) * (4 + 2 * K * 4))


def sum_merge(named: dict) -> dict:
    T, K = named["T"], named["K"]
    n = 2 if named.get("HAS_Y") else 1
    return dict(matrix=False, trips=1, nbytes=n * (T + named["_grid"][0]) * K * 4)


def bn_finalize(named: dict) -> dict:
    T, K = named["T"], named["K"]
    return dict(matrix=False, trips=math.ceil(T / named["BLOCK_T"]), nbytes=T * 4 + 2 * T * K * 4 + 5 * K * 4)


def bn_backward_partials(named: dict) -> dict:
    reads = ["gout_ptr"] + (["out_ptr"] if named.get("RELU") else []) + (["y_ptr"] if named.get("HAS_Y") else [])
    writes = ["psum_ptr"] + (["psumy_ptr"] if named.get("HAS_Y") else []) + (["g_ptr"] if named.get("WRITE_G") else [])
    return dict(matrix=False, trips=1, nbytes=_nbytes(named, *reads, *writes))


def scale_shift_act(named: dict) -> dict:
    reads = ["y_ptr"] + (["res_ptr"] if named.get("HAS_RES") else [])
    return dict(matrix=False, trips=1, nbytes=_nbytes(named, *reads, "out_ptr"))


def bn_backward_dy(named: dict) -> dict:
    reads = ["gout_ptr"] + (["out_ptr"] if named.get("RELU") else []) + (["y_ptr"] if named.get("HAS_Y") else [])
    writes = ["dy_ptr"] + (["gres_ptr"] if named.get("WRITE_GRES") else [])
    return dict(matrix=False, trips=1, nbytes=_nbytes(named, *reads, *writes))


def running_stats(named: dict) -> dict:
    return dict(matrix=False, trips=1, nbytes=4 * 4 * named["K"])


# kernel (JITFunction) name -> work function(named arguments, constexprs and configuration included)
WORK = {
    "_conv2d_fprop_kernel": fprop,
    "_pack_input_kernel": pack_input,
    "_conv2d_dgrad_kernel": dgrad,
    "_conv2d_wgrad_kernel": wgrad,
    "_split_reduce_kernel": split_reduce,
    "_bn_finalize_kernel": bn_finalize,
    "_chan_merge_kernel": chan_merge,
    "_sum_merge_kernel": sum_merge,
    "_bn_backward_partials_kernel": bn_backward_partials,
    "_scale_shift_act_kernel": scale_shift_act,
    "_bn_backward_dy_kernel": bn_backward_dy,
    "_running_stats_kernel": running_stats,
}
# Kernels whose main loop is a GEMM K loop: their loop is compared with the control matmul,
# per 64-wide K step.
MATRIX_KERNELS = ("_conv2d_fprop_kernel", "_conv2d_dgrad_kernel", "_conv2d_wgrad_kernel")
