"""What ``backend="auto"`` costs on a CPU: a model converted with ``resconv.convert`` against the
same model unconverted (plain torch.nn), eval forward and training step, side by side.

    python benchmarks/cpu_overhead.py [--models resnet18,resnet50] [--formats nchw,channels_last]
                                      [--batch 4] [--size 224] [--out DIR]

Times are medians over ``--rounds`` alternating measurements (each the median of
``torch.utils.benchmark.Timer.blocked_autorange``, ms per call) on this machine's CPU with
torch's threads as configured: the two models alternate so that load and drift hit both, and
each round's ratio is taken from that round's pair (the median of those is reported, with
their range). Writes ``cpu_overhead.json`` and ``cpu_overhead.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils import benchmark

import resconv


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def measure(name: str, fmt: str, batch: int, size: int, min_run_time: float, rounds: int) -> list[dict]:
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
                calls[label] = benchmark.Timer(stmt="model(x)", globals=dict(model=model, x=x))
            else:
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                calls[label] = benchmark.Timer(stmt="step(model, opt, x, y)",
                                               globals=dict(step=_train_step, model=model, opt=opt, x=x, y=y))
        ctx = torch.inference_mode if mode == "eval" else torch.enable_grad
        times: dict = {label: [] for label in calls}
        with ctx():
            for timer in calls.values():
                timer.timeit(2)  # warm-up
            for _ in range(rounds):  # alternate, so that load from elsewhere hits both alike
                for label, timer in calls.items():
                    times[label].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
        med = {label: statistics.median(v) for label, v in times.items()}
        paired = [r / t for r, t in zip(times["resconv auto"], times["torch.nn"])]
        rows.append(dict(model=name, format=fmt, mode=mode, batch=batch, size=size, rounds=rounds,
                         torch_nn_ms=med["torch.nn"], resconv_ms=med["resconv auto"], ratio=statistics.median(paired),
                         ratio_min=min(paired), ratio_max=max(paired),
                         all_ms={k: [round(t, 2) for t in v] for k, v in times.items()}))
        print(f"{name:10s} {fmt:13s} {mode:10s} torch.nn {med['torch.nn']:8.1f} ms  resconv {med['resconv auto']:8.1f} ms"
              f"  ratio {rows[-1]['ratio']:.3f} ({min(paired):.2f}-{max(paired):.2f})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50", help="torchvision model names, comma-separated")
    p.add_argument("--formats", default="nchw,channels_last", help="input and model memory formats, comma-separated")
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed calls per measurement")
    p.add_argument("--rounds", type=int, default=5, help="alternating measurements of each model (median taken)")
    p.add_argument("--out", type=Path, default=Path("resconv-results/cpu_overhead"), help="result folder")
    args = p.parse_args()
    rows = []
    load_before = os.getloadavg()
    for name in args.models.split(","):
        for fmt in args.formats.split(","):
            rows += measure(name.strip(), fmt.strip(), args.batch, args.size, args.min_run_time, args.rounds)
    info = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, resconv=resconv.__version__, command=" ".join(["python"] + sys.argv),
                load_average_before=load_before, load_average_after=os.getloadavg(), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_overhead.json").write_text(json.dumps(info, indent=2))
    lines = [f"# resconv auto vs torch.nn on the CPU ({info['cpu']}, {info['threads']} threads, torch {info['torch']})",
             "", f"`{info['command']}`; load average {info['load_average_before'][0]:.2f} before, "
             f"{info['load_average_after'][0]:.2f} after.", "",
             "Median ms per call over alternating rounds (torch.utils.benchmark); ratio = resconv / torch.nn, the "
             "median of the rounds' paired ratios, with their range (1.00: no cost).", "",
             "| model | format | mode | batch x size | torch.nn ms | resconv ms | ratio | range |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['format']} | {r['mode']} | {r['batch']} x {r['size']}^2 | {r['torch_nn_ms']:.1f} | "
              f"{r['resconv_ms']:.1f} | {r['ratio']:.3f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |" for r in rows]
    (args.out / "cpu_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/cpu_overhead.json, cpu_overhead.md")


if __name__ == "__main__":
    main()
