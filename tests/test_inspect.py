"""``resconv inspect`` on the CPU: the Triton kernels compile for sm_90 the way the speed
budgets of issue 14 need (a regression guard on machine code, not a timing).

One run of ``resconv inspect --quick`` in a subprocess without TRITON_INTERPRET (kernels are
compiled, never run): four ImageNet layers of the kinds the kernels treat differently (the
packed stem, a 3x3 stride-1 conv with a residual, a 1x1 stride-2 downsample, a 3x3 stride-2
conv), eval forward and training step, every configuration the autotuner may pick for them.
Then, from its JSON:

* every configuration compiles; HGMMA (wgmma) wherever BLOCK_M >= 64 and warps >= 4;
  no spills (stack frame 0, no local-memory instructions);
* main loop, per warp and 64-wide K step, against the plain Triton matmul at the same tile:
  fprop <= 1.4x, dgrad and wgrad <= 2x;
* the statistics merges are trees (no one-program grid, no program walking the partials);
* every output says the times are estimates from machine code.

Also the pure parts of the tool on a synthetic listing (SASS parsing, the main loop, the
estimate model), which need no compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ("_conv2d_fprop_kernel", "_conv2d_dgrad_kernel", "_conv2d_wgrad_kernel")
LOOP_BUDGET = {"_conv2d_fprop_kernel": 1.4, "_conv2d_dgrad_kernel": 2.0, "_conv2d_wgrad_kernel": 2.0}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "resconv", "inspect", "--quick", "--no-progress", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, f"resconv inspect failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out, json.loads((out / "inspect.json").read_text()), r.stdout


def test_every_configuration_compiles_with_hgmma_and_no_spills(quick_run):
    _, res, _ = quick_run
    own = [c for c in res["compiles"] if not c["is_control"]]
    assert not [c for c in own if c["error"]], "compile failures"
    matrix = [c for c in own if c["kernel"] in MATRIX]
    assert len({c["kernel"] for c in matrix}) == 3, "fprop, dgrad and wgrad must all be inspected"
    for c in matrix:
        if c["config"]["BLOCK_M"] >= 64 and c["num_warps"] >= 4:
            assert c["mma"] == "HGMMA", f"{c['kernel']} {c['tile']}: {c['mma']}, not HGMMA"
            assert c["wgmma_a_from"] == "shared", f"{c['kernel']} {c['tile']}: wgmma reads A from registers"
        assert c["loop_load_kind"] in ("cp.async", "TMA", "TMA+cp.async"), \
            f"{c['kernel']} {c['tile']}: {c['loop_load_kind']} loads"
        # 16-byte loads wherever every operand's rows allow them (the odd-width stem's packed
        # rows are 8-byte aligned: X_ALIGN 4 bf16 elements)
        aligned = all(v >= 8 for k, v in c["flags"].items() if k.endswith("_ALIGN"))
        assert 16 in c["loop_load_widths"] or c["loop_load_kind"] == "TMA" or not aligned, \
            f"{c['kernel']} {c['tile']}: no 16-byte loads"
    for c in own:
        assert c["stack_bytes"] == 0 and c["local_memory_instructions"] == 0, f"{c['kernel']} {c['tile']} spills"


def test_filters_load_through_tma(quick_run):
    """fprop and dgrad read their filter tiles with TMA (UTMALDG in the SASS) on sm_90 where
    Triton is 3.8 or newer; the pointer path stays for older Triton and the interpreter."""
    import triton

    from resconv.triton_kernels._common import _triton_at_least

    _, res, _ = quick_run
    for kernel in ("_conv2d_fprop_kernel", "_conv2d_dgrad_kernel"):
        rows = [c for c in res["compiles"] if c["kernel"] == kernel and not c["is_control"]]
        assert rows
        for c in rows:
            # every ResNet-18 layer's filters but the stem's (7 taps x 4 channels: rows of 28,
            # which no 16-element-aligned TMA box tiles; its C_VEC is 4)
            vec = c["flags"].get("C_VEC", c["flags"].get("K_VEC"))
            fits = vec == 8 and not c["flags"].get("FLAT_K", False)
            assert c["flags"]["W_TMA"] == (fits and _triton_at_least(3, 8)), (kernel, c["tile"], triton.__version__)
            assert c["uses_tma"] == c["flags"]["W_TMA"], (kernel, c["tile"])
            if c["uses_tma"]:
                assert "TMA" in c["loop_load_kind"], (kernel, c["tile"], c["loop_load_kind"])


def test_main_loops_within_budget(quick_run):
    _, res, _ = quick_run
    rows = [c for c in res["compiles"] if c["kernel"] in MATRIX and not c["is_control"]]
    assert rows
    for c in rows:
        ratio = c["loop_vs_control"]
        assert ratio is not None, f"{c['kernel']} {c['tile']}: no control"
        assert ratio <= LOOP_BUDGET[c["kernel"]], (
            f"{c['kernel']} {c['tile']} {c['flags']}: {c['loop_per_k64']:.0f} instructions per 64-wide K step, "
            f"{ratio:.2f}x the control's {c['control_loop_per_k64']:.0f}")


def test_statistics_merges_are_trees(quick_run):
    _, res, _ = quick_run
    merges = [launch for row in res["layers"] for launch in row["launches"]
              if launch["kernel"] in ("_chan_merge_kernel", "_bn_finalize_kernel", "_sum_merge_kernel")]
    assert merges
    for launch in merges:
        assert launch["chosen"]["programs"] > 1 and launch["chosen"]["estimate"]["trips"] <= 1, launch


def test_outputs_say_estimates(quick_run):
    out, res, stdout = quick_run
    assert "not measurements" in res["note"] and "ESTIMATES" in res["note"]
    assert res["note"] in (out / "inspect.md").read_text()
    assert (out / "inspect.png").stat().st_size > 0
    assert "not measurements" in stdout


# ---- the pure parts ------------------------------------------------------------------------
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64], P0 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   IADD3 R2, P1, R2, 0x80, RZ ;
        /*0050*/              @P2 BRA 0x20 ;
        /*0060*/                   STG.E desc[UR4][R2.64], R24 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_main_loop_and_facts():
    from resconv.bench import sass

    facts = sass.summarize(LISTING)
    assert facts["loops"] == 1 and facts["loop_instructions"] == 4  # 0x20..0x50
    assert facts["mma"] == "HGMMA" and facts["mma_shape"] == "64x64x16" and facts["wgmma_a_from"] == "shared"
    assert facts["loop_load_kind"] == "cp.async" and facts["loop_load_widths"] == [16]
    assert facts["loop_classes"] == {"cp.async": 1, "mma": 1, "integer/other": 1, "branch": 1}
    reg_a = LISTING.replace("R24, gdesc[UR8], R24", "R24, R120, gdesc[UR8], R24")
    assert sass.summarize(reg_a)["wgmma_a_from"] == "registers"


def test_estimate_model_is_the_documented_one():
    from resconv.bench import estimate

    m = estimate.H200
    assert abs(m.clock_hz - 989e12 / (4096 * 132)) < 1
    # 128x128x64 tile, 8 warps, a 100-instruction loop: tensor-bound at the wgmma cap
    e = estimate.matrix_kernel(m, tile=(128, 128, 64), warps=8, loop_instructions=100, total_instructions=100,
                               trips=10, programs=132, blocks_per_sm=1, mma="HGMMA", operand="bfloat16",
                               useful_flops=132 * 10 * 2 * 128 * 128 * 64, nbytes=0)
    assert e["mma_cycles"] == 512 and e["issue_cycles"] == 200
    assert abs(e["fraction_of_peak"] - m.wgmma_cap) < 1e-9 and e["wave_efficiency"] == 1.0
    # the same loop at 5x the instructions: issue-bound
    e = estimate.matrix_kernel(m, tile=(128, 128, 64), warps=8, loop_instructions=500, total_instructions=500,
                               trips=10, programs=133, blocks_per_sm=1, mma="HGMMA", operand="bfloat16",
                               useful_flops=1.0, nbytes=0)
    assert e["issue_cycles"] == 1000 and abs(e["wave_efficiency"] - 133 / 264) < 1e-12
    assert abs(e["compute_s"] - 2 * 10 * 1000 / m.clock_hz) < 1e-15
    r = estimate.roofline(m, 989e12, 4.3e12)
    assert r["time_s"] == pytest.approx(1.0) and r["compute_s"] == pytest.approx(1.0)
