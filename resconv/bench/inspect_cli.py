"""``resconv inspect``: argument parsing and printing; the work is in :mod:`resconv.bench.inspect`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .._app import HelpFormatter, UsageError, add_out, default_out, existing_file, positive_int

DESCRIPTION = """\
Compile every resconv Triton kernel of ResNet-18 for a GPU architecture without a GPU
(Triton's compiler, ptxas and cuobjdump from its wheel), with each layer's real argument
specialisation and every configuration the autotuner may pick, read the machine code
(registers, spills, shared memory, tensor-core instruction, load kind, main-loop length
against a plain Triton matmul of the same tile), and ESTIMATE each layer's time on an H200
against its roofline bound. The times are estimates from machine code, not measurements.

Writes inspect.json, inspect.md and inspect.png into --out.
"""
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FORMATS = {"channels_last": "channels_last", "nchw": "contiguous"}


def _list(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="compile the Triton kernels for sm_90 without a GPU; estimate their speed",
                       description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--arch", type=positive_int, default=90, help="SM architecture to compile for")
    p.add_argument("--variants", type=_list, default="imagenet,cifar",
                   help="ResNet-18 variants (comma-separated): imagenet (224 px), cifar (32 px)")
    p.add_argument("--passes", type=_list, default="eval,train",
                   help="what to inspect (comma-separated): eval (inference forward), train (a training step)")
    p.add_argument("--batch", type=positive_int, default=256, help="batch size")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="activation and filter dtype")
    p.add_argument("--format", choices=tuple(FORMATS), default="channels_last", help="memory format")
    p.add_argument("--configs", choices=("all", "first"), default="all",
                   help="every configuration the autotuner may pick, or only the first (largest) kept")
    p.add_argument("--quick", action="store_true",
                   help="a few representative ImageNet layers only (the CI check; no whole-model totals)")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="compile processes")
    add_out(p, "inspect")
    p.add_argument("--baseline", type=existing_file, metavar="INSPECT_JSON",
                   help="an earlier inspect.json to compare with (before/after columns, the halving check)")
    p.add_argument("--report", type=existing_file, metavar="INSPECT_JSON",
                   help="only render inspect.md and inspect.png from an inspect.json (into --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        if "triton" in sys.modules:
            raise UsageError("run without TRITON_INTERPRET=1 (kernels must be compiled, not interpreted)")
        del os.environ["TRITON_INTERPRET"]  # before triton is imported: kernels compile, never run here
    from . import inspect_report as report

    out = Path(args.out) if args.out else default_out("inspect")
    baseline = report.load_json(args.baseline) if args.baseline else None
    if args.report is not None:
        results = report.load_json(args.report)
        written = report.write_all(results, out, baseline)
        print(report.terminal(results))
        print("written: " + ", ".join(str(w) for w in written))
        return 0

    from . import inspect as inspect_
    from tqdm import tqdm

    bad = [p for p in args.passes if p not in inspect_.PASSES] + \
        [v for v in args.variants if v not in ("imagenet", "cifar")]
    if bad:
        raise UsageError(f"unknown pass or variant {bad} (passes: {', '.join(inspect_.PASSES)}; "
                         "variants: imagenet, cifar)")
    s = inspect_.Settings(arch=args.arch, variants=args.variants, passes=args.passes, batch=args.batch,
                          dtype=DTYPES[args.dtype],
                          memory_format=FORMATS[args.format], configs=args.configs, quick=args.quick, jobs=args.jobs)
    bar = tqdm(total=0, unit="compile", desc="compiling for sm_%d" % args.arch, file=sys.stderr,
               disable=True if args.no_progress else None)

    def progress(done, total, facts):
        bar.total = total
        bar.update(1)

    try:
        results = inspect_.run(s, progress)
    finally:
        bar.close()
    written = report.write_all(results, out, baseline)
    print(report.terminal(results))
    print(f"{results['timing']['compiles']} compiles in {results['timing']['total_s']:.0f} s; written: "
          + ", ".join(str(w) for w in written))
    failed = [c for c in results["compiles"] if c.get("error")]
    return 1 if failed else 0
