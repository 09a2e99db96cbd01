"""PNG charts (matplotlib, object-oriented API: no pyplot, no GUI backend needed).

* ``layers.png``: per layer, each provider's speedup over eager, one panel per mode, at the
  largest batch of the run's first dtype and memory format.
* ``e2e.png``: ResNet-18 images/s per provider, one panel per end-to-end case.
"""
from __future__ import annotations

import math
from pathlib import Path

# How a provider that has no number shows, in the charts and the tables (report.py).
STATUS_MARK = {"failed": "FAIL", "error": "ERROR", "unavailable": "n/a", "skipped": "skip"}


def smoke_note(results: dict):
    """The warning every output of a run without a GPU carries, or None for a GPU run."""
    if results["env"].get("gpu"):
        return None
    return ("CPU smoke run: small shapes, Triton kernels in its interpreter; a check of the harness, "
            "not a measurement (these times say nothing about GPU speed)")


def _figure(*args, **kwargs):
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def _layer_name(layer: dict, with_variant: bool) -> str:
    """The module's name in the model and its shape: 'layer2.0.conv1  3x3/2  64->128 @56px'."""
    prefix = f"{layer['variant']}: " if with_variant else ""
    return f"{prefix}{layer['name']}  {layer['R']}x{layer['S']}/{layer['stride'][0]}  {layer['C']}->{layer['K']} " \
           f"@{layer['H']}px"


def _ratio(v: float, _pos=None) -> str:
    """Tick label of a speedup: '2x', '1x', '0.5x', '0.06x' (no long binary fractions)."""
    return f"{v:.3g}x" if v >= 1 else f"{v:.2g}x"


def layers_chart(results: dict, path: Path) -> bool:
    """Per layer, each provider's speedup over eager (log scale, 1x marked), one panel per mode,
    at the largest batch of the run's first dtype and memory format: horizontal bars, one row
    per layer named as in the model."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = results["layers"]
    if not rows:
        return False
    dt, fmt = rows[0]["dtype"], rows[0]["fmt"]
    b = max(r["batch"] for r in rows if (r["dtype"], r["fmt"]) == (dt, fmt))
    modes = [m for m in ("eval", "train-fwd", "train-fwdbwd", "train-bwd")
             if any(r["mode"] == m and r["batch"] == b for r in rows)]
    panels = []
    for mode in modes:
        sel = [r for r in rows if (r["mode"], r["dtype"], r["fmt"], r["batch"]) == (mode, dt, fmt, b)]
        names = [n for n in dict.fromkeys(n for r in sel for n in r["providers"])
                 if n != "eager" and any("speedup_vs_eager" in r["providers"].get(n, {}) for r in sel)]
        panels.append((mode, sel, names))
    n_rows = sum(max(1, len(sel)) for _, sel, _ in panels)
    fig = _figure(figsize=(10.0, 1.2 + 0.32 * n_rows * max(1, max(len(n) for _, _, n in panels)) ** 0.5 +
                           0.9 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[max(1, len(sel)) for _, sel, _ in panels])[:, 0]
    variants = {r["layer"]["variant"] for r in rows}
    for ax, (mode, sel, names) in zip(axes, panels):
        height = 0.8 / max(1, len(names))
        for j, n in enumerate(names):
            xs = [r["providers"].get(n, {}).get("speedup_vs_eager", math.nan) for r in sel]
            ax.barh([k + (j - (len(names) - 1) / 2) * height for k in range(len(sel))], xs, height, label=n)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)  # ratios: 2x faster and 2x slower are the same distance from 1x
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(FuncFormatter(_ratio))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(sel)), [_layer_name(r["layer"], len(variants) > 1) for r in sel], fontsize=7)
        ax.invert_yaxis()  # network order, top to bottom
        ax.set_xlabel("speedup over eager PyTorch (log scale; right of the line: faster)")
        ax.set_title(f"{mode}, {dt}, {fmt}, N={b} (no bar: not run, unavailable or failed)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(_title(results, "per-layer speedup over eager PyTorch"), fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def e2e_chart(results: dict, path: Path) -> bool:
    rows = results["e2e"]
    if not rows:
        return False
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = _figure(figsize=(5.2 * cols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, r in zip(axes, rows):
        names = list(r["providers"])
        ys = [r["providers"][n].get("images_per_s", 0.0) for n in names]
        bars = ax.bar(range(len(names)), ys, color=["tab:gray" if n.startswith(("eager", "compile")) else "tab:blue"
                                                     for n in names])
        for bar_, n in zip(bars, names):
            rec = r["providers"][n]
            ok = rec.get("status") == "ok"
            text = f"{rec['images_per_s']:.3g}" if ok else STATUS_MARK.get(rec.get("status"), "?")
            ax.annotate(text, (bar_.get_x() + bar_.get_width() / 2, bar_.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("images/s")
        ax.set_title(r["label"], fontsize=9)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    fig.suptitle(_title(results, "ResNet-18 end to end"), fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def _device(results: dict) -> str:
    env = results["env"]
    return env.get("gpu") or f"CPU {env.get('cpu')}"


def _title(results: dict, what: str) -> str:
    smoke = smoke_note(results) is not None
    return f"resconv {what}: {_device(results)}" + ("\nCPU SMOKE RUN: A CHECK OF THE HARNESS, NOT A MEASUREMENT"
                                                    if smoke else "")


def write_charts(results: dict, outdir: Path) -> list[Path]:
    """Write layers.png and e2e.png where there is data; nothing (and a note in the results)
    when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        results.setdefault("notes", []).append("matplotlib is not installed: no PNG charts")
        return []
    written = []
    for name, fn in (("layers.png", layers_chart), ("e2e.png", e2e_chart)):
        if fn(results, outdir / name):
            written.append(outdir / name)
    return written
