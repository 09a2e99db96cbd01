"""The one table the conformance tests are generated from.

Each conv case is a set of torch.nn.Conv2d arguments with a small input (the Triton kernels
run under the interpreter on CPU); the matrix crosses them with dtypes, memory formats,
epilogue variants (eval-mode BatchNorm, residual, ReLU) and backends.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

# name -> nn.Conv2d arguments and input size. Small, but with partial tiles, several row
# tiles (N*P*Q > 64), several channel chunks (C > 64), every nn.Conv2d argument.
CONV_CASES: dict[str, dict] = {
    "3x3": dict(N=2, C=16, H=9, W=8, K=24, kernel_size=3, padding=1),
    "1x1_stride2": dict(N=2, C=16, H=9, W=9, K=32, kernel_size=1, stride=2),
    "stem_7x7_rgb": dict(N=2, C=3, H=16, W=15, K=16, kernel_size=7, stride=2, padding=3),
    "same_even_4x4": dict(N=2, C=8, H=7, W=9, K=8, kernel_size=4, padding="same"),
    "same_dilated": dict(N=1, C=8, H=8, W=7, K=8, kernel_size=(2, 3), dilation=2, padding="same"),
    "valid_rect_5x3": dict(N=2, C=8, H=9, W=7, K=16, kernel_size=(5, 3), padding="valid"),
    "stride_2x1_pad_1x2": dict(N=2, C=8, H=9, W=6, K=16, kernel_size=3, stride=(2, 1), padding=(1, 2)),
    "dilation_2x3": dict(N=2, C=8, H=10, W=11, K=16, kernel_size=3, dilation=(2, 3), padding=2),
    "groups_4": dict(N=2, C=16, H=7, W=7, K=32, kernel_size=3, padding=1, groups=4),
    "depthwise": dict(N=2, C=16, H=8, W=8, K=16, kernel_size=3, padding=1, groups=16),
    "depthwise_x2": dict(N=2, C=8, H=6, W=6, K=16, kernel_size=5, padding=2, groups=8),
    "bias": dict(N=2, C=12, H=6, W=7, K=20, kernel_size=3, padding=1, bias=True),
    "reflect": dict(N=2, C=8, H=6, W=7, K=8, kernel_size=3, padding=1, padding_mode="reflect", bias=True),
    "replicate": dict(N=2, C=8, H=6, W=7, K=8, kernel_size=3, padding=(2, 1), padding_mode="replicate"),
    "circular": dict(N=2, C=8, H=6, W=7, K=8, kernel_size=3, padding=1, padding_mode="circular"),
    "unbatched": dict(N=None, C=8, H=7, W=6, K=16, kernel_size=3, padding=1),
    "empty_batch": dict(N=0, C=8, H=5, W=5, K=8, kernel_size=3, padding=1),
    "kernel_eq_input": dict(N=3, C=8, H=5, W=5, K=8, kernel_size=5),
    "multi_tile": dict(N=3, C=80, H=7, W=7, K=72, kernel_size=3, padding=1),
    "odd_channels": dict(N=2, C=5, H=9, W=7, K=7, kernel_size=3, padding=1, bias=True),
}

# (name, torch dtype, allow_tf32): "tf32" is float32 on TF32 tensor cores (IEEE on CPU).
DTYPES = [
    ("float32", torch.float32, False),
    ("tf32", torch.float32, True),
    ("float16", torch.float16, False),
    ("bfloat16", torch.bfloat16, False),
]
FORMATS = ["nchw", "nhwc", "strided"]
EPILOGUES = list(itertools.product([False, True], repeat=3))  # (bn, residual, relu)
FULL_EPILOGUE_CASES = ("3x3", "stem_7x7_rgb")


@dataclass
class Case:
    conv: str
    dtype: str
    fmt: str
    bn: bool
    residual: bool
    relu: bool
    params: dict = field(repr=False, default_factory=dict)

    @property
    def id(self) -> str:
        epi = "+".join(n for n, on in (("bn", self.bn), ("res", self.residual), ("relu", self.relu)) if on) or "plain"
        return f"{self.conv}-{self.dtype}-{self.fmt}-{epi}"


def eval_cases() -> list[Case]:
    """Every conv case x dtype x format with no epilogue and with all of it; every epilogue
    combination for the FULL_EPILOGUE_CASES."""
    out = []
    for conv, dt, fmt in itertools.product(CONV_CASES, [d[0] for d in DTYPES], FORMATS):
        epis = EPILOGUES if conv in FULL_EPILOGUE_CASES else [(False, False, False), (True, True, True)]
        for bn, res, relu in epis:
            out.append(Case(conv, dt, fmt, bn, res, relu, CONV_CASES[conv]))
    return out


def train_cases() -> list[Case]:
    """Training mode (BatchNorm always on): every conv case in float32 and bfloat16, both
    dense formats, with and without residual+ReLU; every (residual, ReLU) pair and dtype for
    the 3x3 case."""
    out = []
    for conv in CONV_CASES:
        if CONV_CASES[conv]["N"] in (None, 0):
            continue  # unbatched and empty batches have their own training tests
        for dt, fmt, rr in itertools.product(["float32", "bfloat16"], ["nchw", "nhwc"], [False, True]):
            out.append(Case(conv, dt, fmt, True, rr, rr, CONV_CASES[conv]))
    for dt, (res, relu) in itertools.product([d[0] for d in DTYPES], itertools.product([False, True], repeat=2)):
        out.append(Case("3x3", dt, "strided", True, res, relu, CONV_CASES["3x3"]))
    return out


def dtype_of(name: str) -> tuple[torch.dtype, bool]:
    for n, dt, tf32 in DTYPES:
        if n == name:
            return dt, tf32
    raise KeyError(name)


def conv_module(p: dict, dtype=torch.float64) -> nn.Conv2d:
    return nn.Conv2d(
        p["C"], p["K"], p["kernel_size"], p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1),
        p.get("groups", 1), p.get("bias", False), p.get("padding_mode", "zeros"), dtype=dtype,
    )


def random_bn(K: int, dtype=torch.float64) -> nn.BatchNorm2d:
    """A BatchNorm2d with non-trivial affine parameters and running statistics."""
    bn = nn.BatchNorm2d(K, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def make_input(p: dict, dtype: torch.dtype, fmt: str, device) -> torch.Tensor:
    """Random input in the requested layout: 'nchw', 'nhwc' (channels_last) or 'strided'
    (a non-contiguous view: every other column of a wider tensor)."""
    shape = (p["C"], p["H"], p["W"]) if p["N"] is None else (p["N"], p["C"], p["H"], p["W"])
    if fmt == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64).to(dtype).to(device)
        x = wide[..., ::2]
        assert x.numel() == 0 or not x.is_contiguous()
        return x
    x = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    if fmt == "nhwc" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x

