"""``resconv build``: compile the CUDA C++ extension now (the work is :mod:`resconv.build`'s)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ._app import UsageError
from .build import jit_build, parse_arch_list


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "build", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="compile the CUDA C++ extension now (no GPU needed)",
        description="Compile resconv's CUDA C++ extension just in time into the cache (what the first "
        "use on a CUDA tensor would do), and load it. Needs a CUDA build of PyTorch and a CUDA toolkit "
        "(CUDA_HOME); no GPU.",
    )
    p.add_argument("--arch", default=None,
                   help="architectures, as TORCH_CUDA_ARCH_LIST (default: $TORCH_CUDA_ARCH_LIST, else '8.0;9.0')")
    p.add_argument("--build-dir", type=Path, default=None, help="build folder (default: $RESCONV_BUILD_DIR or the cache)")
    p.add_argument("--force", action="store_true", help="recompile everything")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    p.add_argument("--ptxas-verbose", action="store_true",
                   help="print registers, shared memory and spills per kernel (separate build folder)")
    p.set_defaults(func=_run_build)


def _run_build(args) -> int:
    try:
        archs = parse_arch_list(args.arch if args.arch is not None else os.environ.get("TORCH_CUDA_ARCH_LIST"))
    except ValueError as e:
        raise UsageError(f"--arch: {e}") from None
    t0 = time.perf_counter()
    try:
        mod = jit_build(archs, build_dir=args.build_dir, force=args.force, verbose=args.verbose,
                        ptxas_verbose=args.ptxas_verbose)
    except Exception as e:
        print(f"resconv build: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"resconv build: ok in {time.perf_counter() - t0:.1f} s: {mod.__file__} "
          f"(nvcc targets {mod.compiled_arch_list()})")
    return 0
