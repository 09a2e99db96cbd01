"""Render ``resconv inspect`` results: checks against issue 14's budgets, a Markdown report, a
PNG of estimate against roofline per layer, a terminal summary. Every output carries the
results' note: the times are estimates from machine code, not measurements.
"""
from __future__ import annotations

import json
from pathlib import Path

FILES = ("inspect.json", "inspect.md", "inspect.png")
# Budgets of issue 14 (main-loop length against the control matmul at the same tile; the
# stem against its memory bound; the ImageNet eval forward per 256 images; each conv layer's
# fraction of its bound).
FPROP_LOOP, BACKWARD_LOOP, STEM_VS_MEMORY = 1.4, 2.0, 2.0
EVAL_FORWARD_MS, LAYER_FRACTION, MERGE_TRIPS = 1.5, 0.6, 4
MERGE_KERNELS = ("_bn_finalize_kernel", "_bn_backward_finalize_kernel", "_chan_merge_kernel", "_sum_merge_kernel")
# (the backward finalize: the pre-tree merge, in reports made before issue 14)


def _own(results: dict) -> list:
    return [c for c in results["compiles"] if not c.get("is_control")]


def _launches(results: dict):
    for row in results["layers"]:
        for launch in row["launches"]:
            yield row, launch


def checks(results: dict, baseline: dict | None = None) -> list:
    """[{check, value, limit, passed}] for issue 14's budgets (those the results have data for)."""
    own = _own(results)
    ok = [c for c in own if not c.get("error")]
    out = []

    def add(name, value, limit, passed, note=""):
        out.append(dict(check=name, value=value, limit=limit, passed=bool(passed), note=note))

    add("every kernel configuration compiles", f"{len(own) - len(ok)} failed of {len(own)}", "0 failed",
        len(ok) == len(own))
    matrix = [c for c in ok if c["kernel"] in ("_conv2d_fprop_kernel", "_conv2d_dgrad_kernel", "_conv2d_wgrad_kernel")]
    need = [c for c in matrix if c["config"].get("BLOCK_M", 0) >= 64 and c["num_warps"] >= 4]
    no_hgmma = [c for c in need if c.get("mma") != "HGMMA"]
    add("HGMMA wherever BLOCK_M >= 64 and warps >= 4", f"{len(need) - len(no_hgmma)} of {len(need)}",
        "all", not no_hgmma)
    spills = [c for c in ok if c.get("stack_bytes", 0) or c.get("local_memory_instructions", 0)]
    add("no spills (stack frame 0, no LDL/STL)", f"{len(spills)} with spills", "0", not spills,
        ", ".join(sorted({f"{c['kernel']} {c['tile']}" for c in spills}))[:300])
    for kernel, limit, name in (("_conv2d_fprop_kernel", FPROP_LOOP, "fprop"), ("_conv2d_dgrad_kernel",
                                 BACKWARD_LOOP, "dgrad"), ("_conv2d_wgrad_kernel", BACKWARD_LOOP, "wgrad")):
        rows = [c for c in ok if c["kernel"] == kernel and c.get("loop_vs_control") and not c["flags"].get("STEM")
                and not c["flags"].get("FLAT_K") and not c["flags"].get("FLAT_N")]
        if rows:
            worst = max(rows, key=lambda c: c["loop_vs_control"])
            add(f"{name} main loop <= {limit}x the control's (every candidate tile)",
                f"{worst['loop_vs_control']:.2f}x ({worst['tile']})", f"{limit}x", worst["loop_vs_control"] <= limit)
    stem = [r for r in results["layers"] if r["layer"]["first"] and r["layer"]["variant"] == "imagenet"
            and r["pass_"] == "eval"]
    for r in stem:
        ratio = r["estimate_s"] / r["bound"]["memory_s"]
        add("ImageNet stem (eval) <= 2x its memory bound", f"{ratio:.2f}x", f"{STEM_VS_MEMORY}x",
            ratio <= STEM_VS_MEMORY)
    merges = [(row, launch) for row, launch in _launches(results)
              if launch["kernel"] in MERGE_KERNELS and launch["chosen"]]
    if merges:
        one = [x for x in merges if x[1]["chosen"]["programs"] == 1]
        trips = max(x[1]["chosen"]["estimate"]["trips"] for x in merges)
        add("statistics merges: no 1-program grid, no program walking the partials",
            f"{len(one)} one-program launches; up to {trips} partial blocks per program",
            f"0; <= {MERGE_TRIPS}", not one and trips <= MERGE_TRIPS)
    tot = results["totals"].get("imagenet/eval")
    if tot and tot.get("complete"):
        ms = tot["estimate_s"] * 1e3
        add(f"ImageNet eval forward <= {EVAL_FORWARD_MS} ms per {results['settings']['batch']} images",
            f"{ms:.3f} ms ({tot['bound_s'] / tot['estimate_s']:.0%} of the bound)", f"{EVAL_FORWARD_MS} ms",
            ms <= EVAL_FORWARD_MS)
    conv = [r for r in results["layers"] if r["layer"]["variant"] == "imagenet" and r["pass_"] == "eval"]
    if conv:
        worst = min(conv, key=lambda r: r["bound"]["time_s"] / r["estimate_s"])
        frac = worst["bound"]["time_s"] / worst["estimate_s"]
        add(f"every ImageNet conv layer (eval) >= {LAYER_FRACTION} of its bound", f"{frac:.2f} ({worst['layer']['label']})",
            str(LAYER_FRACTION), frac >= LAYER_FRACTION)
    if baseline is not None:
        for key in ("imagenet/train", "cifar/train"):
            a, b = results["totals"].get(key), baseline["totals"].get(key)
            if a and b and a.get("complete") and b.get("complete"):
                gain = b["estimate_s"] / a["estimate_s"]
                add(f"{key} step estimate halved against the baseline", f"{gain:.2f}x faster", "2x", gain >= 2)
    return out


def _ms(s) -> str:
    return "" if s is None else f"{s * 1e3:.3f}"


def _us(s) -> str:
    return "" if s is None else f"{s * 1e6:.1f}"


def _flags(flags: dict) -> str:
    return " ".join(k for k, v in sorted(flags.items()) if v is True and k not in ("DOT_FP32",))


def markdown(results: dict, baseline: dict | None = None) -> str:
    s, env = results["settings"], results["environment"]
    lines = [
        f"# resconv inspect: sm_{s['arch']} machine code, H200 estimates", "",
        f"> **{results['note']}**", "",
        f"Settings: batch {s['batch']}, {s['dtype']}, {s['memory_format']}, variants {', '.join(s['variants'])}, "
        f"configurations: {s['configs']}{' (quick set of layers)' if s['quick'] else ''}. "
        f"Triton {env.get('triton')}, torch {env.get('torch')}, resconv {env.get('resconv')} "
        f"(commit {env.get('git_commit')}), {env.get('date')}. "
        f"{results['timing']['compiles']} compiles in {results['timing']['total_s']:.0f} s "
        f"({results['timing']['workers']} processes).", "",
        f"Machine model: {results['machine']['name']}: {results['machine']['sms']} SMs, "
        f"{results['machine']['peak_tflops']:.0f} TFLOP/s dense bf16, {results['machine']['hbm_tbps']} TB/s reached "
        f"({results['machine']['hbm_tbps_datasheet']} on the datasheet); see *The model* below.", "",
    ]
    lines += ["## Whole model (estimated)", "",
              "| model / pass | estimate (ms) | roofline bound (ms) | bound / estimate |"
              + (" baseline estimate (ms) | baseline / estimate |" if baseline else ""),
              "|---|---:|---:|---:|" + ("---:|---:|" if baseline else "")]
    for key, t in results["totals"].items():
        row = f"| {key}{'' if t['complete'] else ' (partial)'} | {_ms(t['estimate_s'])} | {_ms(t['bound_s'])} | " \
              f"{t['bound_s'] / t['estimate_s']:.2f} |"
        if baseline:
            b = baseline["totals"].get(key)
            row += f" {_ms(b['estimate_s'])} | {b['estimate_s'] / t['estimate_s']:.2f}x |" if b else " | |"
        lines.append(row)
    lines += ["", "Totals: every layer times its occurrences, plus max-pooling, average pooling and the "
              "classifier at their bound (torch ops, not resconv's). 'train' is one training step: forward with "
              "batch statistics and the backward (no optimizer step).", ""]
    cks = results.get("checks") or checks(results, baseline)
    lines += ["## Checks (issue 14's budgets)", "", "| check | value | limit | |", "|---|---|---|---|"]
    for c in cks:
        lines.append(f"| {c['check']} | {c['value']}{' (' + c['note'] + ')' if c['note'] else ''} | {c['limit']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} |")
    base_layers = {}
    if baseline:
        base_layers = {(r["layer"]["label"], r["pass_"]): r for r in baseline["layers"]}
    lines += ["", "## Per layer (estimated, at the configuration the model ranks fastest)", "",
              "| layer | x | pass | estimate (ms) | bound (ms) | bound kind | bound / estimate |"
              + (" baseline (ms) |" if baseline else ""),
              "|---|---:|---|---:|---:|---|---:|" + ("---:|" if baseline else "")]
    for r in results["layers"]:
        L = r["layer"]
        row = (f"| {L['label']} | {L['count']} | {r['pass_']} | {_ms(r['estimate_s'])} | {_ms(r['bound']['time_s'])} | "
               f"{r['bound']['bound']} | {r['bound']['time_s'] / r['estimate_s']:.2f} |")
        if baseline:
            b = base_layers.get((L["label"], r["pass_"]))
            row += f" {_ms(b['estimate_s'])} |" if b else " |"
        lines.append(row)
    lines += ["", "## Per kernel launch (estimated)", "",
              "| layer | pass | kernel | flags | tile | programs | wave eff. | loop trips | estimate (us) | limited by |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for row, launch in _launches(results):
        ch = launch["chosen"]
        if ch is None:
            lines.append(f"| {row['layer']['label']} | {row['pass_']} | {launch['kernel']} | {_flags(launch['flags'])} "
                         f"| (no estimate: {launch['errors']} of {launch['candidates']} failed) | | | | | |")
            continue
        e = ch["estimate"]
        lines.append(f"| {row['layer']['label']} | {row['pass_']} | {launch['kernel']} | {_flags(launch['flags'])} | "
                     f"{ch['tile']} (of {launch['candidates']}) | {ch['programs']} | {e['wave_efficiency']:.2f} | "
                     f"{e['trips']:g} | {_us(e['time_s'])} | {e['bound']} |")
    lines += ["", "## Every compiled binary (machine-code facts, no estimate)", "",
              "Loop: the main loop's SASS instructions per warp, per 64-wide K step for matrix kernels "
              "(per iteration otherwise); control: the plain Triton matmul at the same tile.", "",
              "| kernel | flags | tile | regs | spill stack (B) | LDL/STL | shared (KB) | blocks/SM | MMA | wgmma A | "
              "loop loads | widths (B) | loop | control | loop / control |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|"]
    for c in sorted(results["compiles"], key=lambda c: (c.get("is_control", False), c["kernel"], c["tile"])):
        if c.get("error"):
            lines.append(f"| {c['kernel']} | {_flags(c['flags'])} | {c['tile']} | compile failed: "
                         f"{c['error'][:200]} |" + " |" * 11)
            continue
        ratio = f"{c['loop_vs_control']:.2f}" if c.get("loop_vs_control") else ""
        loop = f"{c['loop_per_k64']:.0f}" if c.get("loop_per_k64") else str(c.get("loop_instructions") or "")
        ctrl = f"{c['control_loop_per_k64']:.0f}" if c.get("control_loop_per_k64") else ""
        lines.append(
            f"| {c['kernel']} | {_flags(c['flags'])} | {c['tile']} | {c['registers']} | {c['stack_bytes']} | "
            f"{c['local_memory_instructions']} | {c['shared_bytes'] / 1024:.0f} | {c.get('occupancy', '')} | "
            f"{c['mma']} | {c['wgmma_a_from'] or ''} | {c['loop_load_kind']} | "
            f"{','.join(str(w) for w in c['loop_load_widths'])} | {loop} | {ctrl} | {ratio} |")
    lines += ["", "## The model", "", "```", results["model"].strip(), "```", ""]
    return "\n".join(lines)


def _short(label: str) -> str:
    variant, rest = label.split("/", 1)
    name, kind, _, _, epi = rest.split(" ")
    return f"{variant[:2]} {name.replace('layer', 'L').replace('downsample.0', 'ds')} {kind}"


def chart(results: dict, path: Path) -> bool:
    """Per layer and pass: estimated time against the roofline bound (log scale)."""
    from matplotlib.figure import Figure

    panels = [(v, p) for v in results["settings"]["variants"] for p in ("eval", "train")
              if any(r["layer"]["variant"] == v and r["pass_"] == p for r in results["layers"])]
    if not panels:
        return False
    fig = Figure(figsize=(13, 3.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (v, p) in zip(axes, panels):
        rows = [r for r in results["layers"] if r["layer"]["variant"] == v and r["pass_"] == p]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["estimate_s"] * 1e3 for r in rows], 0.4, label="estimate (static model)")
        ax.bar([x + 0.2 for x in xs], [r["bound"]["time_s"] * 1e3 for r in rows], 0.4, label="roofline bound")
        ax.set_yscale("log")
        ax.set_ylabel("ms per layer")
        ax.set_xticks(list(xs), [_short(r["layer"]["label"]) for r in rows], rotation=45, ha="right", fontsize=7)
        t = results["totals"].get(f"{v}/{p}")
        total = f": whole model {t['estimate_s'] * 1e3:.2f} ms estimated, bound {t['bound_s'] * 1e3:.2f} ms" if t else ""
        ax.set_title(f"{v} {p}, batch {results['settings']['batch']}, {results['settings']['dtype']}{total}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("ESTIMATES from machine code (sm_%d SASS, static model), not measurements"
                 % results["settings"]["arch"], fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def terminal(results: dict) -> str:
    lines = [results["note"]]
    for key, t in results["totals"].items():
        lines.append(f"  {key:16s} estimate {t['estimate_s'] * 1e3:8.3f} ms   roofline bound {t['bound_s'] * 1e3:8.3f} ms"
                     f"   ({t['bound_s'] / t['estimate_s']:.0%} of the bound){'' if t['complete'] else '  partial'}")
    for c in results.get("checks", []):
        lines.append(f"  [{'pass' if c['passed'] else 'FAIL'}] {c['check']}: {c['value']}")
    return "\n".join(lines)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_all(results: dict, outdir: Path, baseline: dict | None = None) -> list:
    """Write inspect.json, inspect.md and inspect.png (when matplotlib is installed) into outdir."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    results["checks"] = checks(results, baseline)
    written = [outdir / FILES[0], outdir / FILES[1]]
    written[0].write_text(json.dumps(results, indent=1, default=str))
    written[1].write_text(markdown(results, baseline))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    if chart(results, outdir / FILES[2]):
        written.append(outdir / FILES[2])
    return written
