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


def _figure(*args, **kwargs):
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def _short_layer(label: str) -> str:
    """'imagenet/layer2.0.conv1 3x3s2 64>128 56px bn+relu' -> 'in L2.0.c1 3x3s2 +relu'."""
    variant, rest = label.split("/", 1)
    name, kind, _, _, epi = rest.split(" ")
    name = name.replace("layer", "L").replace("conv", "c").replace("downsample.0", "ds")
    return f"{variant[:2]} {name} {kind} {epi.replace('bn', '').lstrip('+') or 'bn'}"


def layers_chart(results: dict, path: Path) -> bool:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = results["layers"]
    if not rows:
        return False
    dt, fmt = rows[0]["dtype"], rows[0]["fmt"]
    b = max(r["batch"] for r in rows if (r["dtype"], r["fmt"]) == (dt, fmt))
    modes = [m for m in ("eval", "train-fwd", "train-fwdbwd", "train-bwd")
             if any(r["mode"] == m and r["batch"] == b for r in rows)]
    fig = None
    for i, mode in enumerate(modes):
        sel = [r for r in rows if (r["mode"], r["dtype"], r["fmt"], r["batch"]) == (mode, dt, fmt, b)]
        names = [n for n in dict.fromkeys(n for r in sel for n in r["providers"])
                 if n != "eager" and any("speedup_vs_eager" in r["providers"].get(n, {}) for r in sel)]
        if fig is None:
            width = min(28.0, max(8.0, 0.35 * len(sel) * max(1, len(names)) ** 0.5 + 4))
            fig = _figure(figsize=(width, 3.8 * len(modes)), layout="constrained")
            axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
        ax = axes[i]
        width = 0.8 / max(1, len(names))
        for j, n in enumerate(names):
            ys = [r["providers"].get(n, {}).get("speedup_vs_eager", math.nan) for r in sel]
            ax.bar([k + (j - (len(names) - 1) / 2) * width for k in range(len(sel))], ys, width, label=n)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)  # ratios: 2x faster and 2x slower are the same distance from 1
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(sel)), [_short_layer(r["layer"]["label"]) for r in sel], rotation=60, ha="right",
                      fontsize=7)
        ax.set_ylabel("speedup over eager (log)")
        ax.set_title(f"{mode}, {dt}, {fmt}, N={b} (missing bar: not run, unavailable or failed)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"resconv per-layer speedup over eager PyTorch: {_device(results)}", fontsize=10)
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
    fig.suptitle(f"ResNet-18 end to end: {_device(results)}", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def _device(results: dict) -> str:
    env = results["env"]
    return env.get("gpu") or f"CPU {env.get('cpu')}"


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
