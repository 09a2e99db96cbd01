"""Tests of the benchmark harness (resconv.bench): a harness test, not a timed test.

* The CPU smoke run of ``resconv bench`` in a subprocess under TRITON_INTERPRET=1: result
  files (JSON schema, Markdown tables, PNG charts), every provider checked and timed.
* In-process checks of the parts: shapes read off the model, FLOP and byte counts, the
  output check (a wrong provider is reported failing and not timed; an exception is an
  error and the run goes on), the time budget, saved-memory accounting, report rendering.
* On a GPU (marker ``gpu``): the CUDA-only paths (events, graphs, cuDNN's fused ops, peak
  memory) on a tiny plan.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from resconv.bench import report
from resconv.bench.cases import LayerCase, make_set, reference, set_bytes
from resconv.bench.check import bounds, compare, rel_error
from resconv.bench.e2e import base_state, build_model, model_flops
from resconv.models import TorchResNet
from resconv.bench.memory import saved_bytes
from resconv.bench.plan import jobs, preset
from resconv.bench.providers import PROVIDERS, Provider
from resconv.bench.roofline import case_work, conv_flops
from resconv.bench.runner import Runner, run
from resconv.bench.shapes import smoke_layers
from resconv.models import resnet18_layers
from resconv.bench.timing import TimerConfig, measure, percentile

STATUSES = {"ok", "failed", "error", "unavailable", "skipped"}
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _torch_plan(**kw):
    """The smoke preset with torch providers only (no Triton: runs in any process)."""
    base = dict(layer_providers=["eager", "bare-conv", "resconv-torch"], e2e_providers=["eager", "resconv-torch"])
    base.update(kw)
    return replace(preset("smoke"), **base)


# ------------------------------------------------------------------------------ the smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``python -m resconv bench`` on the CPU (smoke preset), in a fresh interpreter process."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "resconv", "bench", "--device", "cpu", "--preset", "smoke", "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_smoke_exit_and_files(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["e2e.png", "layers.png", "results.json", "results.md"]
    for png in ("layers.png", "e2e.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "per layer, eval" in proc.stdout  # the terminal table


def test_smoke_json_schema(smoke):
    _, out = smoke
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "resconv-bench/1" and res["complete"] and not res["skipped"]
    env = res["env"]
    for key in ("torch", "triton", "cuda", "python", "date", "command", "device"):
        assert key in env
    assert env["device"] == "cpu" and env["triton_interpret"] is True
    assert "bench" in env["command"] and "--preset smoke" in env["command"]
    assert res["roofline"]["matmul_tflops"]["fp32"] > 0 and res["roofline"]["copy_gbps"] > 0
    plan = res["plan"]
    layers = smoke_layers()
    assert len(res["layers"]) == len(layers) * len(plan["modes"])
    for row in res["layers"]:
        case = LayerCase(next(lay for lay in layers if lay.label == row["layer"]["label"]), row["batch"], row["mode"],
                         row["dtype"], row["fmt"])
        assert row["work"]["fused"]["flops"] == case_work(case, "fused")[0]
        assert row["work"]["fused"]["bound"] in ("compute", "memory")
        assert list(row["providers"]) == plan["layer_providers"]
        for name, rec in row["providers"].items():
            # Every provider of the smoke run serves the CPU (resconv-triton: the interpreter).
            assert rec["status"] == "ok", (row["label"], name, rec)
            assert rec["check"]["ok"] and rec["check"]["err"] <= rec["check"]["tol"]
            t = rec["timing"]
            assert t["reps"] == plan["timer"]["min_reps"] and t["clock"] == "perf_counter"
            assert t["min_ms"] <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
            assert rec["setup_s"] > 0 and rec["roof_fraction"] > 0
            assert rec["speedup_vs_eager"] > 0 and rec["time_vs_bare_conv"] > 0
        if row["mode"] != "eval":  # gradients were checked too
            assert any(k.startswith("grad:") for k in row["providers"]["eager"]["check"]["detail"])
    kinds = {(r["kind"], r["batch"]) for r in res["e2e"]}
    assert kinds == {("inference", 4), ("train", 4)}
    for row in res["e2e"]:
        for rec in row["providers"].values():
            assert rec["status"] == "ok" and rec["images_per_s"] > 0 and rec["tflops"] > 0
    levels = {r["level"] for r in res["memory"]}
    assert levels == {"layer", "model"}
    for row in res["memory"]:
        assert row["saved"]["eager"]["bytes"] > 0
        for name, rec in row["saved"].items():
            assert rec["status"] == "ok" and rec["ratio_vs_eager"] > 0


def test_smoke_markdown(smoke):
    _, out = smoke
    md = (out / "results.md").read_text()
    assert md.startswith("# resconv benchmark")
    for heading in ("## Roofline", "## Headline: fused fprop per layer", "## Per layer: eval", "## Saved for backward",
                    "## End to end", "## Failures and errors", "## How to read"):
        assert heading in md, heading
    # Every Markdown table row has as many cells as its header.
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            n = lines[i - 1].count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == n, lines[j]
                j += 1
            assert j > i + 1  # a table with rows


# ------------------------------------------------------------------------------ shapes, work
def test_resnet18_layers_from_model():
    for variant, size in (("imagenet", 224), ("cifar", 32)):
        layers = resnet18_layers(variant)
        assert len(layers) == 15 and sum(lay.count for lay in layers) == 20  # 17 3x3/7x7 + 3 downsample
        assert layers[0].first and layers[0].C == 3 and sum(lay.first for lay in layers) == 1
        kinds = {lay.kind for lay in layers}
        assert kinds == {"stem", "3x3s1", "3x3s2", "1x1s2"}
        assert sum(lay.residual for lay in layers) == 4 and sum(not lay.relu for lay in layers) == 3
        stem = layers[0]
        assert (stem.R, stem.stride[0]) == ((7, 2) if variant == "imagenet" else (3, 1)) and stem.H == size
    # ResNet-18 at 224x224: 1.814 GMAC of convolutions and classifier (3.63 GFLOP).
    assert abs(model_flops("imagenet", 224, False) / 2e9 - 1.814) < 0.005


def test_case_work_and_set_bytes():
    lay = resnet18_layers("imagenet")[2]  # layer1.0.conv2: 3x3 64->64 at 56, + residual
    assert lay.residual and lay.P == 56
    c = LayerCase(lay, 32, "eval", "bf16", "channels_last")
    f, b = case_work(c, "fused")
    assert f == conv_flops(lay, 32) == 2 * 32 * 64 * 56 * 56 * 64 * 9
    act = 32 * 64 * 56 * 56
    assert b == 2 * (act + 64 * 64 * 9 + act + act)  # x, w, residual read; out written (bf16)
    assert case_work(c, "conv")[1] == 2 * (act + 64 * 64 * 9 + act)
    fb = case_work(replace(c, mode="train-fwdbwd"), "fused")
    assert fb[0] == 3 * f  # fprop + dgrad + wgrad
    assert case_work(replace(c, layer=resnet18_layers("imagenet")[0], mode="train-bwd"), "conv")[0] == \
        conv_flops(resnet18_layers("imagenet")[0], 32)  # the first layer has no dgrad
    assert set_bytes(c) == b


# ------------------------------------------------------------------------------ checks, timing
def test_compare_and_tolerances():
    ref = torch.randn(64, 8)
    assert compare(ref + 1e-6 * torch.randn(64, 8), None, ref, None, [], torch.float32).ok
    bad = ref.clone()
    bad[0, 0] = float("nan")
    r = compare(bad, None, ref, None, [], torch.float32)
    assert not r.ok and r.as_dict()["err"] is None  # NaN never passes; JSON-safe
    assert rel_error(ref[:10], ref) == float("inf")
    g = [torch.randn(3), torch.randn(4)]
    r = compare(ref, [g[0], g[1] * 1.5], ref, g, ["x", "weight"], torch.bfloat16)
    assert not r.ok and r.worst == "grad:weight" and r.tol == bounds(torch.bfloat16)["grad"]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for tf32 in (False, True):
            b = bounds(dt, tf32)
            assert b["out"] <= b["grad"] <= b["model"]


def test_measure_and_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    seen = []
    t = measure(lambda i: seen.append(i), 3, CPU, TimerConfig(warmup_ms=1, rep_ms=1, min_reps=7, max_reps=7))
    assert t.reps == 7 and t.clock == "perf_counter" and set(seen) == {0, 1, 2}  # inputs rotated
    assert t.min_ms <= t.median_ms <= t.p80_ms


# ------------------------------------------------------------------------------ runner behaviour
class _Wrong(Provider):
    """Eager with the output scaled: must be reported failing, not timed."""

    name = "wrong"

    def build(self, case, s):
        fwd, wrt = PROVIDERS["eager"].build(case, s)
        return (lambda: fwd() * 1.1), wrt


class _Raises(Provider):
    name = "raises"

    def build(self, case, s):
        raise RuntimeError("no kernel for this shape")


def test_wrong_provider_fails_and_raising_provider_errors(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "wrong", _Wrong())
    monkeypatch.setitem(PROVIDERS, "raises", _Raises())
    plan = _torch_plan(sections=["layers"], modes=["eval", "train-fwdbwd"],
                       layer_providers=["eager", "wrong", "raises", "cudnn-fused"])
    res = Runner(plan, CPU, progress=False).run()
    assert res["complete"] and len(res["layers"]) == 2 * len(smoke_layers())
    for row in res["layers"]:
        p = row["providers"]
        assert p["eager"]["status"] == "ok"
        assert p["wrong"]["status"] == "failed" and "timing" not in p["wrong"] and "median_ms" not in p["wrong"]
        assert p["wrong"]["check"]["err"] > p["wrong"]["check"]["tol"]
        assert p["raises"]["status"] == "error" and "no kernel for this shape" in p["raises"]["reason"]
        assert p["cudnn-fused"]["status"] == "unavailable"
    lines = report.problems(res)
    assert len(lines) == 2 * len(res["layers"])


def test_time_budget_skips_and_lists_jobs():
    plan = _torch_plan(sections=["layers", "e2e"], time_budget_s=0.0)
    res = Runner(plan, CPU, progress=False).run()
    assert not res["complete"] and res["layers"] == [] and res["e2e"] == []
    assert res["skipped"] == [j.label for j in jobs(plan)]


def test_job_error_loses_the_job_not_the_run(monkeypatch):
    import resconv.bench.runner as runner_mod

    def broken(*a, **k):
        raise MemoryError("out of memory building the inputs")

    monkeypatch.setattr(runner_mod, "make_set", broken)
    plan = _torch_plan(sections=["roofline", "layers"], modes=["eval"])
    res = Runner(plan, CPU, progress=False).run()
    assert res["complete"] and res["roofline"] is not None and res["layers"] == []
    assert len(res["job_errors"]) == len(smoke_layers()) and res["jobs_done"] == res["jobs_total"]
    assert "out of memory building the inputs" in report.markdown(res)


def test_nchw_train_fwd_and_bwd_in_process(tmp_path):
    plan = _torch_plan(sections=["layers", "memory"], formats=["nchw"], modes=["train-fwd", "train-bwd"])
    res = run(plan, CPU, tmp_path, progress=False)
    assert all(p["status"] == "ok" for r in res["layers"] for p in r["providers"].values())
    assert {r["fmt"] for r in res["layers"]} == {"nchw"}
    assert {r["mode"] for r in res["layers"]} == {"train-fwd", "train-bwd"}
    bwd = [r for r in res["layers"] if r["mode"] == "train-bwd"]
    assert all(any(k.startswith("grad:") for k in r["providers"]["resconv-torch"]["check"]["detail"]) for r in bwd)
    md = (tmp_path / "results.md").read_text()
    assert "## Per layer: train-fwd, fp32, nchw, N=2" in md
    # --report re-renders Markdown and charts from the JSON alone.
    from resconv.cli import main

    (tmp_path / "results.md").unlink()
    assert main(["bench", "--report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == md


def test_reference_matches_torch_nn():
    """The layer reference (resconv.reference) is what torch.nn computes, in float64 terms."""
    lay = smoke_layers()[1]
    for mode in ("eval", "train-fwdbwd"):
        case = LayerCase(lay, 2, mode, "fp32", "channels_last")
        s = make_set(case, CPU, torch.Generator().manual_seed(1))
        ctx = torch.inference_mode if mode == "eval" else torch.enable_grad
        with ctx():
            out, grads = PROVIDERS["eager"].prepare(case, [s])(0)
        ref_out, ref_grads = reference(case, s, "fused")
        assert rel_error(out, ref_out) < 1e-5
        if grads is not None:
            assert all(rel_error(g, rg) < 1e-4 for g, rg in zip(grads, ref_grads))


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    b, n = saved_bytes(lambda: (x @ w) * (x @ w), exclude=[w])
    # mm saves x (and w, excluded); the product saves both (x @ w) results: 3 storages.
    assert n == 3 and b == (4 * 8 + 4 * 8 + 4 * 8) * 4
    b2, n2 = saved_bytes(lambda: x[:2] @ w, exclude=[w])
    assert n2 == 1 and b2 == 4 * 8 * 4  # a view saved: its whole storage, once


def test_torch_resnet_twin_matches_resconv_model():
    st = base_state("cifar")
    a, b = build_model("torch", "cifar", st).eval(), build_model("resconv-torch", "cifar", st).eval()
    assert isinstance(a, TorchResNet)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_error(a(x), b(x)) < 1e-5


def test_cli_list(capsys):
    from resconv.cli import main

    argv = ["bench", "--device", "cpu", "--preset", "quick", "--list", "--providers", "+compile,-eager-graph"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "roofline" in out.splitlines()[0] and "jobs (preset quick)" in out
    assert "'compile'" in out and "eager-graph'" not in out.split("layer providers")[1].split(";")[0]
    assert main(["bench", "--list", "--providers", "nonexistent"]) == 2  # an error line, exit status 2
    assert "--providers: unknown ['nonexistent']" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_provider_on_cpu():
    """torch.compile per layer (the `full` preset's provider): compiled once per case, checked,
    timed; its compilation shows as setup time; the retained-graph backward is declared n/a."""
    plan = _torch_plan(sections=["layers"], layer_filter="conv2", modes=["eval", "train-fwdbwd", "train-bwd"],
                       layer_providers=["eager", "compile"])
    res = Runner(plan, CPU, progress=False).run()
    got = {r["mode"]: r["providers"]["compile"] for r in res["layers"]}
    assert got["eval"]["status"] == "ok" and got["train-fwdbwd"]["status"] == "ok", got
    assert got["train-bwd"]["status"] == "unavailable"
    assert got["eval"]["setup_s"] > res["layers"][0]["providers"]["eager"]["setup_s"]


# ------------------------------------------------------------------------------ GPU paths
@pytest.mark.gpu
def test_gpu_paths(tmp_path):
    """CUDA events, graphs, cuDNN's fused ops, peak memory, roofline, on a tiny plan (a few
    seconds once the kernels are compiled; torch.compile is covered by test_compile_provider_on_cpu
    and by the suite itself)."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU (and TRITON_INTERPRET unset)")
    plan = replace(
        preset("quick"), variants=["smoke"], batches=[8], modes=["eval", "train-fwdbwd", "train-bwd"],
        layer_providers=["eager", "bare-conv", "cudnn-fused", "resconv-triton", "resconv-cuda", "eager-graph",
                         "resconv-triton-graph"],
        e2e_variants=["cifar"], e2e_batches=[8], train_batches=[], memory_batches=[8],
        e2e_providers=["eager", "eager-graph", "resconv-triton", "resconv-triton-graph"],
        timer=TimerConfig(warmup_ms=2, rep_ms=5, min_reps=5), e2e_timer=TimerConfig(warmup_ms=5, rep_ms=20, min_reps=3),
    )
    res = run(plan, torch.device("cuda"), tmp_path, progress=False)
    assert res["complete"] and res["roofline"]["matmul_tflops"]["bf16"] > 1 and res["roofline"]["copy_gbps"] > 50
    assert not [p for p in report.problems(res) if "resconv-cuda" not in p], report.problems(res)
    for row in res["layers"]:
        for name, rec in row["providers"].items():
            assert rec["status"] in STATUSES
            if rec["status"] == "ok":
                assert rec["timing"]["clock"] == "cuda-events"
        if row["mode"] == "eval" and row["layer"]["relu"]:
            assert row["providers"]["cudnn-fused"]["status"] == "ok"
            assert row["providers"]["eager-graph"]["status"] == "ok"
    for row in res["e2e"]:
        assert row["providers"]["eager"]["peak_allocated_bytes"] > 0
    assert (tmp_path / "layers.png").exists() and (tmp_path / "e2e.png").exists()
