"""Compile the conv-backward Triton kernels for real GPU targets on a machine without a GPU.

The interpreter accepts programs the GPU compiler refuses (e.g. a @triton.jit helper with
two returns of different shapes), so this runs the launchers with their real argument
specialisation (ints equal to 1 become constants, multiples of 16 are marked divisible),
captures each kernel launch instead of running it, and compiles it with Triton's own
compiler for the requested architectures (ptxas ships with Triton; no driver needed).

Run as a script in a process WITHOUT TRITON_INTERPRET (tests/test_conv_backward.py does):

    python tests/triton_aot_check.py [--arch 90 --arch 80] [--all-configs] [--quick]

Prints one line per compiled kernel (registers, spill stack, shared memory, MMA kind) and
exits non-zero if any compile fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot_check.py: run without TRITON_INTERPRET=1 (kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import resconv.triton_kernels.conv_dgrad as D  # noqa: E402
import resconv.triton_kernels.conv_wgrad as Wg  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class _Recorder:
    """Stands in for an autotuned kernel: records (args, kwargs) of each launch."""

    def __init__(self, autotuned):
        self.jit, self.configs, self.prune = autotuned.fn, autotuned.configs, autotuned.early_config_prune
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _resources(kernel) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _describe(e: BaseException) -> str:
    """The compile error in one line: Triton's CompilationError keeps the cause separately."""
    cause = e.__cause__ if e.__cause__ is not None else e
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip() and line.strip() != "^")
    return f"{type(e).__name__}: {text[:600]} (cause: {cause!r})"


def compile_launch(rec: _Recorder, args, kwargs, cfg, arch: int):
    """Compile one captured launch with one autotune config for sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(rec.jit.signature, rec.jit.params, backend)
    kw = dict(kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bound, spec, options = binder(*args, **kw)
    options, signature, constexprs, attrs = rec.jit._pack_args(backend, kw, bound, spec, options)
    return triton.compile(ASTSource(rec.jit, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cases():
    """(name, launcher call) pairs covering every constexpr branch of dgrad and wgrad."""
    cl = torch.channels_last

    def t(*shape, dt=torch.float16):
        return torch.randn(*shape).to(dt).contiguous(memory_format=cl)

    def pro(dy, K):
        v = torch.rand(K)
        return dict(relu_out=dy, y=dy, a=v, b=v, c=v, mean=v)

    g3 = dict(stride=(2, 2), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    x, w, dy = t(2, 64, 28, 28), t(128, 64, 3, 3), t(2, 128, 14, 14)
    xd, wd, dyd = t(2, 64, 14, 14, dt=torch.bfloat16), t(64, 1, 3, 3, dt=torch.bfloat16), t(2, 64, 14, 14, dt=torch.bfloat16)
    gd = dict(stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=64)
    xs, dys = t(2, 3, 64, 64), t(2, 64, 32, 32)
    gs = dict(stride=(2, 2), padding=(3, 3, 3, 3), dilation=(1, 1), groups=1)
    x32, w32, dy32 = t(2, 64, 14, 14, dt=torch.float32), t(64, 64, 3, 3, dt=torch.float32), t(2, 64, 14, 14, dt=torch.float32)
    g1 = dict(stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    # (name, in the quick set, launch)
    return [
        ("dgrad fp16 3x3 s2", True, lambda: D.conv2d_dgrad(dy, w, input_shape=tuple(x.shape), **g3)),
        ("dgrad fp16 3x3 s2 +dReLU/dBN", True,
         lambda: D.conv2d_dgrad(dy, w, input_shape=tuple(x.shape), **g3, **pro(dy, 128))),
        ("dgrad bf16 depthwise (flat K) +dReLU/dBN", True,
         lambda: D.conv2d_dgrad(dyd, wd, input_shape=tuple(xd.shape), **gd, **pro(dyd, 64))),
        ("dgrad tf32 3x3", False, lambda: D.conv2d_dgrad(dy32, w32, input_shape=tuple(x32.shape), **g1, allow_tf32=True)),
        ("wgrad fp16 3x3 s2 +bias (split)", True,
         lambda: Wg.conv2d_wgrad(dy, x, weight_shape=tuple(w.shape), **g3, need_bias=True)),
        ("wgrad fp16 3x3 s2 +dReLU/dBN (direct)", True,
         lambda: Wg.conv2d_wgrad(dy, x, weight_shape=tuple(w.shape), **g3, split_k=1, **pro(dy, 128))),
        ("wgrad fp16 stem 7x7 (flat N) +dReLU/dBN", True,
         lambda: Wg.conv2d_wgrad(dys, xs, weight_shape=(64, 3, 7, 7), **gs, **pro(dys, 64))),
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

    # Launchers run on CPU tensors here: no device checks, no CUDA queries, nothing launched.
    D.check_device = Wg.check_device = lambda *a: None
    torch.cuda.device = lambda *a: contextlib.nullcontext()
    torch.cuda.current_device = lambda: 0
    Wg._sm_count = lambda index: 132  # an H100
    dgrad, wgrad = _Recorder(D._conv2d_dgrad_autotuned), _Recorder(Wg._conv2d_wgrad_autotuned)
    reduce_rec = _Recorder(type("Plain", (), dict(fn=Wg._split_reduce_kernel, configs=[], early_config_prune=None)))
    D._conv2d_dgrad_autotuned, Wg._conv2d_wgrad_autotuned, Wg._split_reduce_kernel = dgrad, wgrad, reduce_rec

    failures = 0
    for name, core, launch in _cases():
        if opts.quick and not core:
            continue
        for rec in (dgrad, wgrad):
            rec.calls.clear()
        launch()
        for rec in (dgrad, wgrad):
            for args, kwargs in rec.calls:
                named = dict(zip(rec.jit.arg_names, args), **kwargs)
                cfgs = rec.prune(rec.configs, named, **kwargs)
                for cfg in cfgs if opts.all_configs else cfgs[:1]:
                    tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    label = f"{name}: sm_{{}} {tile} w{cfg.num_warps} s{cfg.num_stages}"
                    for arch in archs:
                        try:
                            k = compile_launch(rec, args, kwargs, cfg, arch)
                        except Exception as e:  # a compile error is the finding: report it and go on
                            failures += 1
                            print(f"FAIL {label.format(arch)}: {_describe(e)}", flush=True)
                            continue
                        regs, stack = _resources(k)
                        ptx = k.asm["ptx"]
                        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no-mma"
                        print(f"OK   {label.format(arch)}: {regs} regs, {stack} B spill stack, "
                              f"{k.metadata.shared} B shared, {mma}", flush=True)
    if reduce_rec.calls:  # the split reduction: one plain (not autotuned) kernel
        args, kwargs = reduce_rec.calls[0]
        cfg = triton.Config({}, num_warps=4, num_stages=3)
        for arch in archs:
            try:
                compile_launch(reduce_rec, args, kwargs, cfg, arch)
                print(f"OK   split reduction: sm_{arch}", flush=True)
            except Exception as e:
                failures += 1
                print(f"FAIL split reduction: sm_{arch}: {_describe(e)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
