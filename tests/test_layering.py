"""The package's import structure (shared/DESIGN.md, the rules in resconv/ops/__init__.py),
read from the source with ``ast``: every import, module-level or inside a function, counts.

* no import cycle anywhere in resconv;
* layers import downwards only: cli -> apps (verify, train, bench, summary_cli, demo,
  experiments) -> models / convert / model_summary ->
  nn -> functional -> ops -> {reference, _conv_args, tolerances, build, triton_kernels};
  the apps never import resconv.ops;
* modules import each other directly (``from .x import name``, ``import resconv.x as y``),
  never through resconv/__init__.py (``from resconv import x``, ``from . import x`` in a
  top-level module, ``from .. import x`` one level down, ``import resconv``);
* inside resconv/ops: the backends (triton.py, cuda.py) never import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder -> package it installs as (pyproject.toml's package-dir).
FOLDERS = {ROOT / "resconv": "resconv", ROOT / "triton_kernels": "resconv.triton_kernels"}

# Layer of each module (a prefix names a package and everything in it); imports go from a
# higher number to a lower or equal one.
LAYERS = [
    ("resconv._conv_args", 0), ("resconv.tolerances", 0), ("resconv.build", 0), ("resconv._version", 0),
    ("resconv.triton_kernels", 0),
    ("resconv.reference", 1),
    ("resconv.ops", 2),
    ("resconv.functional", 3),
    ("resconv.nn", 4),
    ("resconv.models", 5), ("resconv.convert", 5), ("resconv.model_summary", 5),
    ("resconv._app", 6), ("resconv.verify", 6), ("resconv.train", 6), ("resconv.bench", 6), ("resconv.build_cli", 6),
    ("resconv._cmd", 6), ("resconv.summary_cli", 6), ("resconv.demo", 6), ("resconv.experiments", 6),
    ("resconv.recipes", 6), ("resconv.train_figures", 6), ("resconv.data", 6),
    ("resconv.cli", 7), ("resconv.__main__", 7), ("resconv", 8),
]
APPS = ("resconv._app", "resconv.verify", "resconv.train", "resconv.bench", "resconv.build_cli", "resconv.cli",
        "resconv.__main__", "resconv._cmd", "resconv.summary_cli", "resconv.demo", "resconv.experiments",
        "resconv.recipes", "resconv.train_figures", "resconv.data")


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg] + parts)] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path):
    """(target module, the import's text, through resconv/__init__.py) for each import of resconv."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "resconv" or a.name.startswith("resconv."):
                    yield a.name, f"import {a.name}", a.name == "resconv" or a.asname is None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == "resconv" or mod.startswith("resconv.")):
                continue
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub if sub in MODULES else mod), text, mod == "resconv"


EDGES = {name: list(_imports(name, path)) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    best = None
    for prefix, rank in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    assert best is not None, f"{name}: no layer in tests/test_layering.py"
    return best[1]


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_cycle():
    graph = {n: sorted({t for t, _, _ in EDGES[n] if t in MODULES and t != n}) for n in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_imports_go_down_the_layers():
    bad = [f"{n} ({_layer(n)}) imports {t} ({_layer(t)}): {text}"
           for n, edges in EDGES.items() for t, text, _ in edges if t in MODULES and _layer(t) > _layer(n)]
    assert not bad, "\n".join(bad)


def test_apps_do_not_import_ops():
    bad = [f"{n}: {text}" for n, edges in EDGES.items() if n.startswith(APPS)
           for t, text, _ in edges if t == "resconv.ops" or t.startswith("resconv.ops.")]
    assert not bad, "\n".join(bad)


def test_no_import_through_the_package_face():
    bad = [f"{n}: {text}" for n, edges in EDGES.items() if n not in ("resconv", "resconv.__main__")
           for _, text, face in edges if face]
    assert not bad, "\n".join(bad)


def test_backends_do_not_import_each_other():
    for a, b in (("resconv.ops.triton", "resconv.ops.cuda"), ("resconv.ops.cuda", "resconv.ops.triton")):
        assert not [t for t, _, _ in EDGES[a] if t == b or t.startswith(b + ".") or t.startswith(b + "_")], (a, b)


def test_the_checker_sees_what_it_checks():
    """The rules above are only as good as the import reading: spot-check it."""
    assert ("resconv.ops.autograd" in {t for t, _, _ in EDGES["resconv.ops.triton"]})
    assert "resconv.ops.triton" in {t for t, _, _ in EDGES["resconv.ops"]}
    assert _layer("resconv.ops.cuda") == 2 and _layer("resconv.bench.runner") == 6
