"""What ``backend="auto"`` costs on a CPU: a model converted with ``resconv.convert`` against the
same model unconverted (plain torch.nn), eval forward and training step, side by side.

    python benchmarks/cpu_overhead.py [--models resnet18,resnet50] [--formats nchw,channels_last]
                                      [--batch 4] [--size 224] [--pairs 40] [--out DIR]

Method: after warm-up, ``--pairs`` pairs of single calls (one of each model, ms of wall clock
and of this process's CPU time), the order within a pair alternating (A B, B A, ...) so that
neither model always runs first. A shared 2-core machine drifts by tens of percent over
seconds; pairing calls a few hundred ms apart cancels that drift, where medians of separate
multi-second blocks did not (the previous method's rounds spread from 0.70 to 1.40). Reported:
the median of the pairs' ratios (resconv / torch.nn) with its quartiles, for wall clock and
for CPU time, and each model's median ms. Writes ``cpu_overhead.json`` and
``cpu_overhead.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import resconv


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(v, n=4)
    return q1, q2, q3


def measure(name: str, fmt: str, batch: int, size: int, pairs: int, warmup: int = 3) -> list[dict]:
    torch.manual_seed(0)
    plain = getattr(torchvision.models, name)(num_classes=100)
    fused = resconv.convert(copy.deepcopy(plain))
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100, (batch,))
    rows = []
    for mode in ("eval", "train step"):
        calls = {}
        for label, model in (("torch.nn", plain), ("resconv auto", fused)):
            model = model.to(memory_format=memory_format)
            if mode == "eval":
                model.eval()
                calls[label] = functools.partial(model, x)
            else:
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                calls[label] = functools.partial(_train_step, model, opt, x, y)
        ctx = torch.inference_mode if mode == "eval" else torch.enable_grad
        wall: dict = {label: [] for label in calls}
        cpu: dict = {label: [] for label in calls}
        labels = list(calls)
        with ctx():
            for call in calls.values():
                for _ in range(warmup):
                    call()
            for i in range(pairs):
                for label in (labels if i % 2 == 0 else labels[::-1]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    calls[label]()
                    cpu[label].append((time.process_time() - c0) * 1e3)
                    wall[label].append((time.perf_counter() - t0) * 1e3)
        row = dict(model=name, format=fmt, mode=mode, batch=batch, size=size, pairs=pairs)
        for clock, times in (("wall", wall), ("cpu", cpu)):
            ratios = [r / t for r, t in zip(times["resconv auto"], times["torch.nn"])]
            q1, q2, q3 = _quartiles(ratios)
            row[clock] = dict(torch_nn_ms=statistics.median(times["torch.nn"]),
                              resconv_ms=statistics.median(times["resconv auto"]),
                              ratio=q2, ratio_q1=q1, ratio_q3=q3,
                              all_ms={k: [round(t, 2) for t in v] for k, v in times.items()})
        rows.append(row)
        w, c = row["wall"], row["cpu"]
        print(f"{name:10s} {fmt:13s} {mode:10s} torch.nn {w['torch_nn_ms']:8.1f} ms  resconv {w['resconv_ms']:8.1f} ms"
              f"  ratio {w['ratio']:.3f} ({w['ratio_q1']:.3f}-{w['ratio_q3']:.3f})  cpu-time ratio {c['ratio']:.3f}",
              flush=True)
    return rows


def _commit() -> str:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or '' outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50", help="torchvision model names, comma-separated")
    p.add_argument("--formats", default="nchw,channels_last", help="input and model memory formats, comma-separated")
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--pairs", type=int, default=40, help="pairs of single calls (one of each model) per case")
    p.add_argument("--out", type=Path, default=Path("resconv-results/cpu_overhead"), help="result folder")
    args = p.parse_args()
    rows = []
    load_before = os.getloadavg()
    for name in args.models.split(","):
        for fmt in args.formats.split(","):
            rows += measure(name.strip(), fmt.strip(), args.batch, args.size, args.pairs)
    info = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, resconv=resconv.__version__, commit=_commit(), command=" ".join(["python"] + sys.argv),
                load_average_before=load_before, load_average_after=os.getloadavg(), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_overhead.json").write_text(json.dumps(info, indent=2))
    lines = [f"# resconv auto vs torch.nn on the CPU ({info['cpu']}, {info['threads']} threads, torch {info['torch']})",
             "", f"`{info['command']}` at {info['commit'] or 'an unknown commit'}; load average {info['load_average_before'][0]:.2f} before, "
             f"{info['load_average_after'][0]:.2f} after.", "",
             "Pairs of single calls, order alternating; ratio = resconv / torch.nn, the median of the pairs' "
             "ratios with its quartiles (1.00: no cost); ms: each model's median.", "",
             "| model | format | mode | batch x size | torch.nn ms | resconv ms | ratio (wall) | quartiles | "
             "ratio (CPU time) | quartiles |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['format']} | {r['mode']} | {r['batch']} x {r['size']}^2 | "
              f"{r['wall']['torch_nn_ms']:.1f} | {r['wall']['resconv_ms']:.1f} | {r['wall']['ratio']:.3f} | "
              f"{r['wall']['ratio_q1']:.3f}-{r['wall']['ratio_q3']:.3f} | {r['cpu']['ratio']:.3f} | "
              f"{r['cpu']['ratio_q1']:.3f}-{r['cpu']['ratio_q3']:.3f} |" for r in rows]
    (args.out / "cpu_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/cpu_overhead.json, cpu_overhead.md")


if __name__ == "__main__":
    main()
