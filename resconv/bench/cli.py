"""``resconv bench``: argument parsing and printing; the work is in :mod:`resconv.bench.runner`."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from .._app import RESULTS_DIR, HelpFormatter, UsageError, existing_file, positive_float, positive_int

DESCRIPTION = """\
Benchmark resconv against eager PyTorch (cuDNN), torch.compile and cuDNN's fused ops:
every distinct conv of ResNet-18 (ImageNet 224 and CIFAR 32) per layer in inference and
training modes, ResNet-18 end to end (inference and a training step), saved-for-backward
memory, and the GPU's roofline measured in the same run. Every provider's output is checked
against a float32 reference before it is timed.

Without a GPU this runs the CPU smoke run (small shapes; torch providers and resconv's torch
and Triton-interpreter backends): a check of the harness, not a measurement, and every
output says so.

Results: a summary here, and results.json, results.md, layers.png and e2e.png in --out
(default ./resconv-results/bench/<gpu-or-cpu>/<date>/ in the working directory).
"""

EPILOG = """\
presets: smoke (CPU), quick (GPU default), full (everything, torch.compile per layer included;
  far longer)
lists (comma-separated): --providers replaces the preset's providers for layers and end to
  end (names not applicable to a section are ignored there); +name / -name add or remove.
examples:
  resconv bench                                   # the default for this machine
  resconv bench --preset full --time-budget 3000
  resconv bench --sections layers --batches 32,1 --modes train-fwdbwd --providers +compile
  resconv bench --dtypes bf16,fp16,fp32 --formats channels_last,nchw --sections layers,e2e
  resconv bench --report resconv-results/bench/<gpu>/<date>/results.json   # re-render md/png
"""
# The command line a re-executed run records (the user's, not the re-run's).
COMMAND_ENV = "RESCONV_BENCH_COMMAND"


def _list(text: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _choices(*valid: str):
    def parse(text: str) -> list:
        items = _list(text)
        bad = [i for i in items if i not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; expected some of {', '.join(valid)}")
        return items

    return parse


def _ints(text: str) -> list:
    out = []
    for t in _list(text):
        try:
            out.append(positive_int(t))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark suite (per layer, end to end, roofline)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=("smoke", "quick", "full"), default=None,
                   help="what to run (default: quick on a GPU, smoke without)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: the GPU when one is usable, else the CPU smoke run)")
    p.add_argument("--sections", type=_choices("roofline", "layers", "memory", "e2e"), default=None,
                   help="of roofline,layers,memory,e2e (default: the preset's)")
    p.add_argument("--variants", type=_choices("imagenet", "cifar", "smoke"), default=None,
                   help="layer sets: imagenet,cifar,smoke (default: the preset's)")
    p.add_argument("--layer-filter", metavar="TEXT", help="only layers whose label contains TEXT (e.g. 3x3s2)")
    p.add_argument("--batches", type=_ints, help="per-layer batch sizes (default: the preset's, e.g. 256,32,1)")
    p.add_argument("--modes", type=_choices("eval", "train-fwd", "train-fwdbwd", "train-bwd"), default=None,
                   help="eval,train-fwd,train-fwdbwd,train-bwd (default: the preset's)")
    p.add_argument("--dtypes", type=_choices("bf16", "fp16", "fp32"), default=None,
                   help="bf16,fp16,fp32 (fp32 runs in TF32 on a GPU; default: the preset's, bf16)")
    p.add_argument("--formats", type=_choices("channels_last", "nchw"), default=None,
                   help="channels_last,nchw (default: the preset's, channels_last)")
    p.add_argument("--providers", help="comma list, or +name/-name edits of the preset's (see below)")
    p.add_argument("--e2e-variants", type=_choices("imagenet", "cifar"), default=None,
                   help="imagenet,cifar (default: the preset's)")
    p.add_argument("--e2e-image-size", type=positive_int, help="end-to-end input size (default: 224 / 32)")
    p.add_argument("--e2e-batches", type=_ints, help="inference batch sizes (default: the preset's, e.g. 256,64,1)")
    p.add_argument("--train-batches", type=_ints, help="training-step batch sizes (default: the preset's, 256)")
    p.add_argument("--memory-batches", type=_ints, help="batch sizes of the saved-memory measurement")
    p.add_argument("--warmup-ms", type=positive_float, help="per-layer warm-up time in ms (default: the preset's)")
    p.add_argument("--rep-ms", type=positive_float, help="per-layer time filled with timed calls, ms")
    p.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                   help="stop starting new jobs after this long (the rest is listed as not run)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="result folder (default: <results-root>/<gpu-or-cpu>/<date>/)")
    p.add_argument("--results-root", type=Path, default=RESULTS_DIR / "bench", metavar="DIR",
                   help="where default result folders go (relative to the working directory)")
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument("--report", type=existing_file, metavar="RESULTS_JSON",
                   help="only render results.md and the charts from a results.json (into its folder or --out)")
    p.add_argument("--list", action="store_true", help="print the jobs of the plan and exit")
    p.add_argument("--no-interpret", action="store_true",
                   help="without a GPU, do not re-run under TRITON_INTERPRET=1 (resconv-triton is then unavailable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per job instead)")
    p.set_defaults(func=main)
    return p


def _edit(current: list, spec: str, valid: dict) -> list:
    items = _list(spec)
    if all(i[0] in "+-" for i in items):
        out = list(current)
        for i in items:
            name = i[1:]
            if i[0] == "+" and name in valid and name not in out:
                out.append(name)
            elif i[0] == "-" and name in out:
                out.remove(name)
        return out
    if any(i[0] in "+-" for i in items):
        raise UsageError("--providers: either a plain list or only +name/-name edits, not both")
    return [i for i in items if i in valid]


def build_plan(args, device):
    import torch  # noqa: F401

    from .e2e import E2E_PROVIDERS
    from .plan import default_preset, preset
    from .providers import PROVIDERS
    from .timing import TimerConfig

    name = args.preset or default_preset(device)
    plan = preset(name)
    simple = {"sections": "sections", "variants": "variants", "layer_filter": "layer_filter", "batches": "batches",
              "modes": "modes", "dtypes": "dtypes", "formats": "formats", "e2e_variants": "e2e_variants",
              "e2e_image_size": "e2e_image_size", "e2e_batches": "e2e_batches", "train_batches": "train_batches",
              "memory_batches": "memory_batches", "time_budget": "time_budget_s"}
    changes = {field: getattr(args, arg) for arg, field in simple.items() if getattr(args, arg) is not None}
    plan = replace(plan, **changes)
    if args.providers:
        names = {i.lstrip("+-") for i in _list(args.providers)}
        unknown = sorted(n for n in names if n not in PROVIDERS and n not in E2E_PROVIDERS)
        if unknown:
            raise UsageError(f"--providers: unknown {unknown}; known: {sorted(set(PROVIDERS) | set(E2E_PROVIDERS))}")
        plan = replace(plan, layer_providers=_edit(plan.layer_providers, args.providers, PROVIDERS),
                       e2e_providers=_edit(plan.e2e_providers, args.providers, E2E_PROVIDERS))
    if args.warmup_ms is not None or args.rep_ms is not None:
        t = plan.timer
        plan = replace(plan, timer=TimerConfig(
            warmup_ms=t.warmup_ms if args.warmup_ms is None else args.warmup_ms,
            rep_ms=t.rep_ms if args.rep_ms is None else args.rep_ms,
            min_reps=t.min_reps, max_reps=t.max_reps, min_warmup_calls=t.min_warmup_calls))
    try:
        plan.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return name, plan


def _reexec_under_interpreter(args, plan) -> None:
    """Without a GPU, Triton's kernels run only in its interpreter, which must be chosen
    before triton is imported: start this command again in a fresh process with
    TRITON_INTERPRET=1 (the new process records the command as the user typed it). Only for a
    command-line invocation."""
    if args.no_interpret or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "resconv-triton" not in plan.layer_providers + plan.e2e_providers:
        return
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog not in ("resconv", "__main__.py") or "bench" not in sys.argv[1:]:
        return  # called from Python (e.g. a test): resconv-triton reports itself unavailable
    if importlib_util_missing("triton"):
        return
    from .env import command_line

    argv = [sys.executable, "-m", "resconv", *sys.argv[1:]]
    os.execve(sys.executable, argv, dict(os.environ, TRITON_INTERPRET="1", **{COMMAND_ENV: command_line()}))


def importlib_util_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def main(args) -> int:
    from .._app import LOG, dated_folder, prepare_device

    if args.report is not None:
        from . import report

        results = report.load_json(args.report)
        outdir = args.out or args.report.parent
        written = report.write_all(results, outdir)
        print(report.terminal(results))
        print("written: " + ", ".join(str(w) for w in written))
        return 0

    device_name = prepare_device(args.device, triton_may_run=False)
    import torch

    from . import report
    from .env import slug
    from .plan import jobs
    from .runner import run

    device = torch.device(device_name)
    name, plan = build_plan(args, device)
    todo = jobs(plan)
    if args.list:
        for j in todo:
            print(f"{j.section:8s} {j.label}")
        print(f"{len(todo)} jobs (preset {name}); layer providers {plan.layer_providers}; "
              f"end-to-end providers {plan.e2e_providers}")
        return 0
    if device.type == "cpu":
        _reexec_under_interpreter(args, plan)  # returns only when it need not (or cannot) re-run
        what = ": small shapes, a check of the harness, not a measurement" if name == "smoke" else ""
        LOG.info("no CUDA GPU %s: running on the CPU (preset %s%s)", "used" if args.device == "cpu" else "found",
                 name, what)

    outdir = None
    if not args.no_write:
        if args.out is not None:
            outdir = args.out
        else:
            where = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else f"cpu-{os.uname().machine}"
            outdir = dated_folder(args.results_root / where)
    budget = f", time budget {plan.time_budget_s:.0f} s" if plan.time_budget_s is not None else ""
    LOG.info("preset %s, %d jobs on %s%s%s", name, len(todo), device, budget,
             f", results in {outdir}" if outdir else "")
    results = run(plan, device, outdir, progress=False if args.no_progress else None)
    print(report.terminal(results))
    if outdir is not None:
        names = [n for n in ("results.json", "results.md", "layers.png", "e2e.png") if (outdir / n).exists()]
        notes = f" ({'; '.join(results['notes'])})" if results.get("notes") else ""
        print(f"results in {outdir}: {', '.join(names)}{notes}")
    bad = [p for p in report.problems(results) if " -- resconv-" in p or ": failed:" in p]
    return 1 if bad else 0
