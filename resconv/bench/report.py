"""Results out: JSON (everything), Markdown (tables for people), a terminal summary, and the
PNG charts (:mod:`resconv.bench.plots`).

JSON schema ``resconv-bench/1`` (top-level keys):

* ``env``: device, GPU, driver, torch, triton, CUDA, cuDNN versions, date, exact command.
* ``plan``: what was asked for; ``tolerances``: relative L2 errors allowed, per dtype.
* ``roofline``: ``matmul_tflops`` {dtype: TFLOP/s}, ``copy_gbps`` (read + write), raw timings.
* ``layers``: one row per case (``layer``, ``batch``, ``mode``, ``dtype``, ``fmt``,
  ``work`` {fused|conv: flops, bytes, roof_ms, bound}, ``n_sets``, ``providers``).
* ``memory``: saved-for-backward bytes per layer and per model, per provider.
* ``e2e``: one row per end-to-end case (``kind`` inference|train, ``batch``, ...,
  ``flops_per_image``, ``providers``).
* ``job_errors``: jobs lost to an exception outside any provider (building inputs, the
  reference); ``skipped``: jobs not run (time budget); ``complete``; ``jobs_total``,
  ``jobs_done``; ``elapsed_s``.

A provider record: ``status`` ok | failed (output check failed: not timed) | error (an
exception; ``reason`` has it) | unavailable (``reason``) | skipped (time budget);
``setup_s``; ``check`` {ok, err, worst, tol, detail}; ``median_ms`` and ``timing``
{median_ms, p20_ms, p80_ms, min_ms, mean_ms, reps, clock}; ``tflops``, ``gbps``,
``roof_fraction``, ``speedup_vs_eager``, ``time_vs_bare_conv``; end to end also
``images_per_s``, ``peak_allocated_bytes``, ``peak_reserved_bytes``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from . import plots
from .plots import STATUS_MARK, smoke_note


def write_json(results: dict, path: Path) -> None:
    """Write atomically (a run killed mid-write leaves the previous complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != "resconv-bench/1":
        raise ValueError(f"{path}: not a resconv bench result (schema {data.get('schema')!r})")
    return data


def write_all(results: dict, outdir: Path) -> list[Path]:
    """results.json, results.md, layers.png and e2e.png (charts when matplotlib is installed)."""
    outdir.mkdir(parents=True, exist_ok=True)
    charts = plots.write_charts(results, outdir)  # first: a missing matplotlib adds a note
    write_json(results, outdir / "results.json")
    (outdir / "results.md").write_text(markdown(results))
    return [outdir / "results.json", outdir / "results.md"] + charts


# ---------------------------------------------------------------------------- tables
def table(headers: list, rows: list, markdown_: bool = True) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    if markdown_:
        out = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _cell_ms(rec: Optional[dict], speedup: bool = True) -> str:
    if not rec:
        return ""
    if rec.get("status") != "ok":
        return STATUS_MARK.get(rec.get("status"), "?")
    s = f"{rec['median_ms']:.4g}"
    if speedup and "speedup_vs_eager" in rec:
        s += f" ({rec['speedup_vs_eager']:.2f}x)"
    return s


def _geomean(values: list) -> Optional[float]:
    v = [x for x in values if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def _providers_in(rows: list) -> list:
    names: list = []
    for r in rows:
        for n in r["providers"]:
            if n not in names:
                names.append(n)
    return names


def _groups(rows: list, keys: tuple) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def layer_summary_rows(results: dict, mode: str = "eval") -> tuple[list, list]:
    """Geometric means over layers, per provider and batch: speedup over eager and time
    relative to the bare conv (first dtype and format of the run)."""
    rows = [r for r in results["layers"] if r["mode"] == mode]
    if not rows:
        return [], []
    dt, fmt = rows[0]["dtype"], rows[0]["fmt"]
    rows = [r for r in rows if (r["dtype"], r["fmt"]) == (dt, fmt)]
    batches = sorted({r["batch"] for r in rows}, reverse=True)
    headers = ["provider"]
    for b in batches:
        headers += [f"N={b} speedup vs eager", f"N={b} time / bare conv"]
    out = []
    for name in _providers_in(rows):
        if all(r["providers"].get(name, {}).get("status") == "unavailable" for r in rows):
            continue  # e.g. CUDA graphs in a training mode
        line = [name]
        for b in batches:
            recs = [r["providers"].get(name, {}) for r in rows if r["batch"] == b]
            ok = [x for x in recs if x.get("status") == "ok"]
            sp = _geomean([x.get("speedup_vs_eager") for x in ok])
            tb = _geomean([x.get("time_vs_bare_conv") for x in ok])
            tag = "" if len(ok) == len(recs) else f" [{len(ok)}/{len(recs)}]"
            line += [f"{sp:.2f}x{tag}" if sp else STATUS_MARK.get(recs[0].get("status"), "") if recs else "",
                     f"{tb:.2f}{tag}" if tb else ""]
        out.append(line)
    return headers, out


def conv3x3_rows(results: dict) -> tuple[list, list]:
    """Fused fprop time over the bare conv's on the 3x3 layers (not the stem), eval, at the
    largest batch of the first dtype and format: issue 5's target (<= 1.25, heading for 1.0)."""
    rows = [r for r in results["layers"] if r["mode"] == "eval"]
    if not rows:
        return [], []
    key = (rows[0]["dtype"], rows[0]["fmt"], max(r["batch"] for r in rows))
    rows = [r for r in rows if (r["dtype"], r["fmt"], r["batch"]) == key
            and r["layer"]["R"] == 3 and not r["layer"]["first"]]
    if not rows:
        return [], []
    headers = [f"provider ({key[0]}, {key[1]}, N={key[2]}, {len(rows)} layers)", "geomean time / bare conv",
               "worst", "worst layer"]
    out = []
    for name in _providers_in(rows):
        ratios = [(r["providers"][name]["time_vs_bare_conv"], r["layer"]["label"]) for r in rows
                  if "time_vs_bare_conv" in r["providers"].get(name, {})]
        if not ratios or name == "bare-conv":
            continue
        worst = max(ratios)
        tag = "" if len(ratios) == len(rows) else f" [{len(ratios)}/{len(rows)}]"
        out.append([name, f"{_geomean([v for v, _ in ratios]):.2f}{tag}", f"{worst[0]:.2f}", worst[1]])
    return headers, out


def e2e_summary_rows(results: dict) -> tuple[list, list]:
    rows = results["e2e"]
    if not rows:
        return [], []
    headers = ["provider"] + [f"{r['kind']} {r['variant']} {r['dtype']} {r['fmt']} N={r['batch']}" for r in rows]
    out = []
    for name in _providers_in(rows):
        line = [name]
        for r in rows:
            rec = r["providers"].get(name, {})
            if rec.get("status") == "ok":
                s = f"{rec['images_per_s']:.4g}"
                if "speedup_vs_eager" in rec:
                    s += f" ({rec['speedup_vs_eager']:.2f}x)"
                line.append(s)
            else:
                line.append(STATUS_MARK.get(rec.get("status"), ""))
        out.append(line)
    return headers, out


def layer_table_rows(rows: list) -> tuple[list, list]:
    names = _providers_in(rows)
    headers = ["layer", "N", "GFLOP", "MB", "bound", "roof ms"] + [f"{n} ms" for n in names] + ["best fused % roof"]
    out = []
    for r in rows:
        w = r["work"]["fused"]
        best = max((p.get("roof_fraction", 0) for n, p in r["providers"].items()
                    if p.get("status") == "ok" and n != "bare-conv"), default=0)
        out.append([r["layer"]["label"], r["batch"], f"{w['flops'] / 1e9:.3g}", f"{w['bytes'] / 1e6:.3g}",
                    w.get("bound", ""), f"{w['roof_ms']:.3g}" if "roof_ms" in w else "",
                    *[_cell_ms(r["providers"].get(n)) for n in names], f"{100 * best:.0f}%" if best else ""])
    return headers, out


def memory_rows(results: dict) -> tuple[list, list]:
    rows = results["memory"]
    names = []
    for r in rows:
        for n in r["saved"]:
            if n not in names:
                names.append(n)
    headers = ["what", "N"] + [f"{n} MiB" for n in names]
    out = []
    for r in rows:
        label = r["label"] if r.get("level") == "layer" else f"model {r['variant']}@{r['image_size']}"
        cells = []
        for n in names:
            rec = r["saved"].get(n, {})
            if rec.get("status") == "ok":
                c = f"{rec['bytes'] / 2**20:.3g}"
                if "ratio_vs_eager" in rec and n != "eager":
                    c += f" ({rec['ratio_vs_eager']:.2f}x)"
                cells.append(c)
            else:
                cells.append(STATUS_MARK.get(rec.get("status"), ""))
        out.append([label, r["batch"], *cells])
    return headers, out


def e2e_rows(results: dict) -> tuple[list, list]:
    headers = ["case", "provider", "img/s", "vs eager", "TFLOP/s", "% roof", "median ms", "p20-p80 ms", "setup s",
               "peak alloc GiB"]
    out = []
    for r in results["e2e"]:
        for n, rec in r["providers"].items():
            if rec.get("status") != "ok":
                out.append([r["label"], n, STATUS_MARK.get(rec.get("status"), "?"), "", "", "", "", "",
                            f"{rec['setup_s']:.1f}" if "setup_s" in rec else "", ""])
                continue
            t = rec["timing"]
            out.append([
                r["label"], n, f"{rec['images_per_s']:.4g}",
                f"{rec['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in rec else "",
                f"{rec['tflops']:.3g}", f"{100 * rec['roof_fraction']:.1f}%" if "roof_fraction" in rec else "",
                f"{rec['median_ms']:.4g}", f"{t['p20_ms']:.4g}-{t['p80_ms']:.4g}", f"{rec['setup_s']:.1f}",
                f"{rec['peak_allocated_bytes'] / 2**30:.2f}" if "peak_allocated_bytes" in rec else "",
            ])
    return headers, out


def problems(results: dict) -> list[str]:
    """One line per failed or erroring provider, and per job lost to an exception."""
    out = [f"{e['job']} -- whole job: error: {e['reason']}" for e in results.get("job_errors", [])]
    for section in ("layers", "e2e"):
        for r in results[section]:
            for n, rec in r["providers"].items():
                if rec.get("status") in ("failed", "error"):
                    out.append(f"{r['label']} -- {n}: {rec['status']}: {rec.get('reason')}")
    for r in results["memory"]:
        for n, rec in r["saved"].items():
            if rec.get("status") == "error":
                out.append(f"saved memory {r['label']} -- {n}: error: {rec.get('reason')}")
    return out


def unavailable(results: dict) -> dict:
    """{provider: {reason: count}} over every case where it could not run."""
    out: dict = {}
    for section in ("layers", "e2e"):
        for r in results[section]:
            for n, rec in r["providers"].items():
                if rec.get("status") == "unavailable":
                    reasons = out.setdefault(n, {})
                    reasons[rec["reason"]] = reasons.get(rec["reason"], 0) + 1
    return out


def setup_totals(results: dict) -> dict:
    tot: dict = {}
    for section in ("layers", "e2e"):
        for r in results[section]:
            for n, rec in r["providers"].items():
                if "setup_s" in rec:
                    tot[n] = tot.get(n, 0.0) + rec["setup_s"]
    return tot


# ---------------------------------------------------------------------------- markdown
def _env_table(env: dict) -> str:
    keys = ["gpu", "driver", "torch", "triton", "cuda", "cudnn", "python", "resconv", "git_commit", "device",
            "triton_interpret"]
    return table(["field", "value"], [[k, env.get(k)] for k in keys])


def markdown(results: dict) -> str:
    env = results["env"]
    note = smoke_note(results)
    title = env.get("gpu") or f"CPU smoke run ({env.get('cpu')})"
    md = [f"# resconv benchmark: {title}, {env['date']}", ""]
    if note:
        md += [f"**{note}.**", ""]
    md += [f"Command: `{env['command']}`", "", _env_table(env), ""]
    if results["complete"]:
        status = "complete"
    elif results["skipped"]:
        status = f"incomplete: {len(results['skipped'])} jobs not run (time budget)"
    else:
        status = (f"incomplete: stopped from outside after {results.get('jobs_done', '?')} of "
                  f"{results.get('jobs_total', '?')} jobs (these are its partial results)")
    md += [f"Run {status}, {results['elapsed_s']:.0f} s.", ""]
    if results["roofline"]:
        rl = results["roofline"]
        md += ["## Roofline, measured in this run", "",
               table(["matmul " + k + " TFLOP/s" for k in rl["matmul_tflops"]] + ["copy GB/s (read+write)"],
                     [[f"{v:.4g}" for v in rl["matmul_tflops"].values()] + [f"{rl['copy_gbps']:.4g}"]]), ""]
    h, rows = layer_summary_rows(results, "eval")
    if rows:
        md += ["## Headline: fused fprop per layer (eval), geometric mean over layers", "",
               "Speedup over eager PyTorch (higher is better) and time relative to the bare conv "
               "(cuDNN's on a GPU; 1.0 = as fast as the conv alone, lower is better). "
               "[k/n]: only k of n layers ran and passed the check.", "", table(h, rows), ""]
    h, rows = conv3x3_rows(results)
    if rows:
        md += ["### Fused fprop against the bare conv on the 3x3 layers", "",
               "Time relative to cuDNN's conv alone (on a GPU, the CUDA backend's target: at most 1.25, heading "
               "for 1.0; a CPU smoke run says nothing about it).",
               "", table(h, rows), ""]
    for mode in ("train-fwd", "train-fwdbwd", "train-bwd"):
        h, rows = layer_summary_rows(results, mode)
        if rows:
            note = (" (the backward alone: resconv's fused backward against cuDNN's dgrad + wgrad and "
                    "PyTorch's BN/ReLU backward in eager)") if mode == "train-bwd" else ""
            md += [f"### {mode}, geometric mean over layers{note}", "", table(h, rows), ""]
    h, rows = e2e_summary_rows(results)
    if rows:
        md += ["## Headline: ResNet-18 end to end, images/s (speedup over eager)", "", table(h, rows), ""]
    for (mode, dt, fmt, b), rows in _groups(results["layers"], ("mode", "dtype", "fmt", "batch")).items():
        h, t = layer_table_rows(rows)
        md += [f"## Per layer: {mode}, {dt}, {fmt}, N={b}", "",
               "Median ms (speedup over eager). bound/roof: the fused op's compute- or memory-bound "
               "roof time from this run's matmul and copy.", "", table(h, t), ""]
    h, rows = memory_rows(results)
    if rows:
        md += ["## Saved for backward (training forward), MiB (ratio to torch.nn)", "", table(h, rows), "",
               MEMORY_NOTE, ""]
    h, rows = e2e_rows(results)
    if rows:
        md += ["## End to end, details", "", table(h, rows), ""]
    tot = setup_totals(results)
    if tot:
        md += ["## Setup time (compilation, autotuning, algorithm search, capture), s, summed over cases", "",
               table(["provider", "setup s"], [[k, f"{v:.1f}"] for k, v in tot.items()]), ""]
    un = unavailable(results)
    if un:
        md += ["## Unavailable providers", ""]
        md += [f"- {n}: " + "; ".join(f"{reason} ({c}x)" for reason, c in reasons.items()) for n, reasons in un.items()]
        md += [""]
    pr = problems(results)
    md += ["## Failures and errors", ""] + ([f"- {p}" for p in pr] if pr else ["None."]) + [""]
    if results["skipped"]:
        md += [f"## Not run: time budget ({len(results['skipped'])} jobs)", ""]
        md += [f"- {s}" for s in results["skipped"]] + [""]
    md += [
        "## How to read", "",
        "- Times are medians of per-call CUDA-event timings (perf_counter on a CPU), after warm-up, "
        "rotating over input sets that together exceed the L2 cache; p20/p80 and repetitions are in "
        "results.json. Setup (first call: compilation, autotuning) is reported separately.",
        "- Every provider's output (and gradients) was compared with a float32 reference before timing; "
        "FAIL means the check failed and the provider was not timed (see Failures).",
        "- eager = torch.nn modules with cudnn.benchmark; bare-conv = the conv alone; cudnn-fused = "
        "torch.cudnn_convolution_(add_)relu on BN-folded filters; *-graph = CUDA graphs; "
        "resconv-<backend> = resconv's fused modules.",
        "- % roof = roof time / measured time, the roof being max(FLOPs / matmul rate, compulsory bytes / "
        "copy rate) measured in this run.", "",
    ]
    return "\n".join(md)


MEMORY_NOTE = ("resconv-torch is the plain-PyTorch reference: in float32 it saves what torch.nn saves; in "
               "float16/bfloat16 it computes the epilogue in float32 (resconv's precision rule) and keeps those "
               "float32 intermediates, so it saves more than torch.nn there. The kernel backends save the conv "
               "output and the block output in the input's dtype.")


def terminal(results: dict) -> str:
    """A short summary for the terminal: headline tables, largest-batch eval layers, problems."""
    note = smoke_note(results)
    out = [note.upper(), ""] if note else []
    if results["roofline"]:
        rl = results["roofline"]
        mm = ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in rl["matmul_tflops"].items())
        out += [f"roofline: matmul {mm}; copy {rl['copy_gbps']:.4g} GB/s", ""]
    evals = [r for r in results["layers"] if r["mode"] == "eval"]
    if evals:
        key = (evals[0]["dtype"], evals[0]["fmt"], max(r["batch"] for r in evals))
        rows = [r for r in evals if (r["dtype"], r["fmt"], r["batch"]) == key]
        h, t = layer_table_rows(rows)
        out += [f"per layer, eval (fused fprop), {key[0]} {key[1]} N={key[2]}: median ms (speedup over eager)",
                table(h, t, markdown_=False), ""]
    for mode in ("eval", "train-fwd", "train-fwdbwd", "train-bwd"):
        h, t = layer_summary_rows(results, mode)
        if t:
            out += [f"per layer, {mode}: geometric mean over layers", table(h, t, markdown_=False), ""]
    h, t = conv3x3_rows(results)
    if t:
        out += ["fused fprop / bare conv, 3x3 layers", table(h, t, markdown_=False), ""]
    h, t = memory_rows(results)
    if t:
        out += ["saved for backward, MiB (ratio to torch.nn)", table(h, t, markdown_=False), MEMORY_NOTE, ""]
    h, t = e2e_summary_rows(results)
    if t:
        out += ["ResNet-18 end to end, images/s (speedup over eager)", table(h, t, markdown_=False), ""]
    pr = problems(results)
    if pr:
        out += [f"{len(pr)} failures/errors:"] + [f"  {p}" for p in pr] + [""]
    if results["skipped"]:
        out += [f"{len(results['skipped'])} jobs not run (time budget)", ""]
    return "\n".join(out)
