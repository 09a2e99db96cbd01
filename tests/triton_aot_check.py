"""Compile the conv Triton kernels for real GPU targets on a machine without a GPU.

The interpreter accepts programs the GPU compiler refuses (e.g. a @triton.jit helper with
two returns of different shapes), so this runs the launchers on meta tensors with their real
argument specialisation, captures each kernel launch instead of running it, and compiles it
with Triton's own compiler for the requested architectures (:mod:`resconv.bench.aot`; ptxas
ships with Triton; no driver needed). The cases cover every constexpr branch of dgrad and
wgrad, beyond ResNet-18's layers (``resconv inspect`` covers those, with the estimates).

Run as a script in a process WITHOUT TRITON_INTERPRET (tests/test_conv_backward.py does):

    python tests/triton_aot_check.py [--arch 90 --arch 80] [--all-configs] [--quick]

Prints one line per compiled kernel (registers, spill stack, shared memory, MMA kind) and
exits non-zero if any compile fails.
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot_check.py: run without TRITON_INTERPRET=1 (kernels must be compiled, not interpreted)")

import torch  # noqa: E402

import resconv.triton_kernels.conv_dgrad as D  # noqa: E402
import resconv.triton_kernels.conv_wgrad as Wg  # noqa: E402
from resconv.bench import aot  # noqa: E402


def _cases():
    """(name, in the quick set, launch) covering every constexpr branch of dgrad and wgrad."""
    cl = torch.channels_last

    def t(*shape, dt=torch.float16):
        return torch.empty(*shape, dtype=dt, device="meta").contiguous(memory_format=cl)

    def pro(dy, K):
        v = torch.empty(K, device="meta")
        return dict(relu_out=dy, y=dy, a=v, b=v, c=v, mean=v)

    g3 = dict(stride=(2, 2), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    x, w, dy = t(2, 64, 28, 28), t(128, 64, 3, 3), t(2, 128, 14, 14)
    xd, wd, dyd = t(2, 64, 14, 14, dt=torch.bfloat16), t(64, 1, 3, 3, dt=torch.bfloat16), t(2, 64, 14, 14, dt=torch.bfloat16)
    gd = dict(stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=64)
    xs, dys = t(2, 3, 64, 64), t(2, 64, 32, 32)
    gs = dict(stride=(2, 2), padding=(3, 3, 3, 3), dilation=(1, 1), groups=1)
    x32, w32, dy32 = t(2, 64, 14, 14, dt=torch.float32), t(64, 64, 3, 3, dt=torch.float32), t(2, 64, 14, 14, dt=torch.float32)
    g1 = dict(stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    x7, w7, dy7 = t(2, 16, 14, 14), t(16, 16, 7, 7), t(2, 16, 14, 14)
    g7 = dict(stride=(1, 1), padding=(3, 3, 3, 3), dilation=(1, 1), groups=1)
    # (name, in the quick set, launch)
    return [
        ("dgrad fp16 3x3 s2", True, lambda: D.conv2d_dgrad(dy, w, input_shape=tuple(x.shape), **g3)),
        ("dgrad fp16 3x3 s2 +dReLU/dBN (materialised)", False,
         lambda: D.conv2d_dgrad(dy, w, input_shape=tuple(x.shape), **g3, **pro(dy, 128))),
        ("dgrad bf16 depthwise (flat K)", True, lambda: D.conv2d_dgrad(dyd, wd, input_shape=tuple(xd.shape), **gd)),
        ("dgrad fp16 7x7 (49 taps: direct compares)", True,
         lambda: D.conv2d_dgrad(dy7, w7, input_shape=tuple(x7.shape), **g7)),
        ("dgrad tf32 3x3", False, lambda: D.conv2d_dgrad(dy32, w32, input_shape=tuple(x32.shape), **g1, allow_tf32=True)),
        ("wgrad fp16 3x3 s2 +bias (split)", True,
         lambda: Wg.conv2d_wgrad(dy, x, weight_shape=tuple(w.shape), **g3, need_bias=True)),
        ("wgrad fp16 3x3 s2 (direct)", True, lambda: Wg.conv2d_wgrad(dy, x, weight_shape=tuple(w.shape), **g3, split_k=1)),
        ("wgrad fp16 stem 7x7 (packed)", True, lambda: Wg.conv2d_wgrad(dys, xs, weight_shape=(64, 3, 7, 7), **gs)),
        ("wgrad bf16 depthwise (flat N)", False, lambda: Wg.conv2d_wgrad(dyd, xd, weight_shape=tuple(wd.shape), **gd)),
        ("wgrad tf32 3x3", True, lambda: Wg.conv2d_wgrad(dy32, x32, weight_shape=tuple(w32.shape), **g1, allow_tf32=True)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="SM architecture, e.g. 90 or 80 (default: 90)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config kept by the pruner, "
                    "not only the largest")
    ap.add_argument("--quick", action="store_true", help="only the cases that cover each constexpr branch once")
    opts = ap.parse_args(argv)
    archs = opts.arch or [90]

    failures = 0
    seen = set()
    for name, core, launch in _cases():
        if opts.quick and not core:
            continue
        with aot.capture() as launches:
            launch()
        for lc in launches:
            kernel = aot.jit_function(lc.kernel).__name__
            for i, cfg in enumerate(lc.configs if opts.all_configs else lc.configs[:1]):
                for arch in archs:
                    key = aot.compile_key(lc, i, arch)
                    if key in seen:
                        continue
                    seen.add(key)
                    label = f"{name}: {kernel} sm_{arch} {cfg.tile}"
                    try:
                        k = aot.compile_launch(lc, i, arch)
                    except Exception as e:  # a compile error is the finding: report it and go on
                        failures += 1
                        print(f"FAIL {label}: {aot.describe_error(e)}", flush=True)
                        continue
                    res = aot.resources(k.asm["cubin"])
                    ptx = k.asm["ptx"]
                    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no-mma"
                    print(f"OK   {label}: {res['registers']} regs, {res['stack_bytes']} B spill stack, "
                          f"{k.metadata.shared} B shared, {mma}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
