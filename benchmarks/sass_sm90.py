"""Machine-code facts of resconv's CUDA C++ kernels for sm_90a, without a GPU.

Reads the compiled extension (resconv._C, built with TORCH_CUDA_ARCH_LIST containing 9.0a)
with cuobjdump and reports, per kernel: registers, spills (local memory), shared memory, the
instruction kinds that matter on Hopper (HGMMA = wgmma, HMMA = mma.sync, UTMALDG/UTMASTG = TMA,
LDGSTS = cp.async) and the main loop (the innermost loop holding the MMAs: its instructions
per warp, its MMAs, and the multiply-adds per warp each instruction buys). Everything here is
read from machine code: no time is measured, and any speed drawn from it is an estimate.

    python benchmarks/sass_sm90.py [--so PATH] [--out DIR] [--check] [--baseline-rev REV]

--so: the extension (default: the JIT build for 8.0;9.0a in $RESCONV_BUILD_DIR or the cache);
--out: write sass_sm90.json and README.md there (default benchmarks/results/static-sm90);
--check: fail (exit 1) unless every Hopper kernel (fprop in its three epilogue variants,
dgrad, wgrad; float16 and bfloat16) holds HGMMA and UTMALDG and none spills (CI runs this);
--baseline-rev: also compile the hand-written kernels of git revision REV for sm_90a (nvcc,
PyTorch's headers) and compare their main loops with the current ones.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
ARCH = "sm_90a"
COUNTED = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "BAR.SYNC", "SYNCS", "WARPGROUP")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


@dataclass
class Loop:
    start: int
    end: int
    instructions: int = 0
    mma: int = 0
    macs_per_warp: int = 0  # multiply-adds one warp's MMA instructions of one iteration perform


@dataclass
class Kernel:
    name: str  # demangled, shortened
    family: str  # hopper-fprop-eval / -residual / -stats, hopper-dgrad, hopper-wgrad, hand-written ..., other
    dtype: str
    registers: int = 0
    local_bytes: int = 0  # spills land in local memory
    shared_bytes: int = 0
    instructions: int = 0
    counts: dict = field(default_factory=dict)
    mma_shape: str = ""
    main_loop: Optional[Loop] = None
    producer_loop: Optional[Loop] = None


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit (CUDA_HOME), or the triton wheel's NVIDIA tools."""
    cands = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cands.append(str(Path(home) / "bin" / "cuobjdump"))
    try:
        import triton

        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and Path(c).is_file():
            return c
    raise FileNotFoundError("cuobjdump not found (PATH, $CUDA_HOME/bin, or the triton wheel's backends/nvidia/bin)")


def default_extension() -> Path:
    """The JIT build of resconv._C for 8.0;9.0a (resconv.build's folder for that list)."""
    sys.path.insert(0, str(REPO))
    from resconv import build

    d = build.default_build_dir(build.parse_arch_list("8.0;9.0a"))
    libs = sorted(d.glob(f"{build.EXT_NAME}*.so"), key=lambda p: p.stat().st_mtime)
    if not libs:
        raise FileNotFoundError(f"no built extension in {d}: run `resconv build --arch '8.0;9.0a'` first")
    return libs[-1]


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def classify(mangled: str, demangled: str) -> tuple[str, str]:
    """(family, dtype) of a kernel from its names."""
    dtype = ("bfloat16" if ("bfloat16" in demangled or "__nv_bfloat16" in demangled) else
             "float16" if ("half_t" in demangled or "__half" in demangled) else
             "float32" if "float" in demangled else "?")
    if "ConvUniversal" in demangled:
        op = {"E0E": "fprop", "E1E": "dgrad", "E2E": "wgrad"}.get(
            re.search(r"OperatorE(\d)E", mangled).group(0)[-3:] if re.search(r"OperatorE(\d)E", mangled) else "", "?")
        if op == "fprop":
            op += "-stats" if "Sm90BnPartialStats" in demangled else "-residual" if "Sm90SrcFetch" in demangled else "-eval"
        return "hopper-" + op, dtype
    for key in ("conv_fprop_tc_kernel", "conv_dgrad_tc_kernel", "conv_wgrad_tc_kernel", "conv_fprop_simt_kernel",
                "conv_dgrad_simt_kernel", "conv_wgrad_simt_kernel"):
        if key in demangled:
            return "hand-written-" + key.replace("conv_", "").replace("_kernel", ""), dtype
    return "other", dtype


def short_name(family: str, demangled: str) -> str:
    """A readable label: the Hopper kernels by what they compute (their CUTLASS types run to
    kilobytes), the hand-written ones as `kernel<template arguments>`."""
    if family.startswith("hopper-"):
        op = family[len("hopper-"):]
        return f"CUTLASS sm90 {op.replace('-', ' (')}{')' if '-' in op else ''}"
    name = demangled.replace("void ", "", 1).replace("resconv::(anonymous namespace)::", "")
    return name.split("(resconv::")[0]


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """Function name -> [(address, opcode, operands)]."""
    funcs: dict[str, list] = {}
    cur = None
    for line in text.splitlines():
        if "Function :" in line:
            cur = line.split("Function :", 1)[1].strip()
            funcs[cur] = []
            continue
        if cur is None:
            continue
        m = _INSTR.search(line)
        if m:
            funcs[cur].append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def parse_resources(text: str) -> dict[str, dict[str, int]]:
    res: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Function "):
            cur = s[len("Function "):].rstrip(":")
        elif cur and s.startswith("REG:"):
            res[cur] = {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", s)}
            cur = None
    return res


HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def mma_macs(opcode: str) -> int:
    """Multiply-adds one warp's instance of an MMA instruction performs: HGMMA.MxNxK is issued by
    the four warps of a warpgroup (a quarter each); HMMA.<shape> by one warp."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        M, N, K = map(int, m.groups())
        return M * N * K // 4
    m = re.match(r"HMMA\.(\d+)", opcode)
    if m and m.group(1) in HMMA_SHAPES:
        M, N, K = HMMA_SHAPES[m.group(1)]
        return M * N * K
    return 0


def innermost_loop(instrs: list[tuple[int, str, str]], opcode_prefix: str) -> Optional[Loop]:
    """The smallest [target, branch] range of a backward branch that contains an instruction
    starting with `opcode_prefix`."""
    best = None
    for addr, op, operands in instrs:
        if op != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [(a, o) for a, o, _ in instrs if target <= a <= addr]
        mmas = [o for _, o in body if o.startswith(opcode_prefix)]
        if not mmas:
            continue
        if best is None or len(body) < best.instructions:
            best = Loop(start=target, end=addr, instructions=len(body), mma=len(mmas),
                        macs_per_warp=sum(mma_macs(o) for o in mmas))
    return best


def analyse(so: Path) -> list[Kernel]:
    tool = find_cuobjdump()
    sass = subprocess.run([tool, "-sass", "-arch", ARCH, str(so)], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", "-arch", ARCH, str(so)], capture_output=True, text=True,
                         check=True).stdout
    funcs = parse_sass(sass)
    resources = parse_resources(res)
    names = list(funcs)
    kernels = []
    for mangled, demangled in zip(names, demangle(names)):
        family, dtype = classify(mangled, demangled)
        if family == "other":
            continue
        instrs = funcs[mangled]
        r = resources.get(mangled, {})
        counts = {c: sum(1 for _, o, _ in instrs if o.startswith(c)) for c in COUNTED}
        mma_ops = sorted({o for _, o, _ in instrs if o.startswith(("HGMMA", "HMMA"))})
        k = Kernel(name=short_name(family, demangled), family=family, dtype=dtype, registers=r.get("REG", 0),
                   local_bytes=r.get("LOCAL", 0), shared_bytes=r.get("SHARED", 0), instructions=len(instrs),
                   counts=counts, mma_shape=", ".join(mma_ops[:2]))
        k.main_loop = innermost_loop(instrs, "HGMMA" if counts["HGMMA"] else "HMMA")
        if counts["UTMALDG"]:
            k.producer_loop = innermost_loop(instrs, "UTMALDG")
        kernels.append(k)
    kernels.sort(key=lambda k: (not k.family.startswith("hopper"), k.family, k.dtype, k.name))
    return kernels


REQUIRED = [(f"hopper-{op}", dt) for op in ("fprop-eval", "fprop-residual", "fprop-stats", "dgrad", "wgrad")
            for dt in ("float16", "bfloat16")]


def check(kernels: list[Kernel]) -> list[str]:
    """Problems that fail CI: a required Hopper kernel missing, without HGMMA or UTMALDG, or spilling."""
    problems = []
    for family, dtype in REQUIRED:
        found = [k for k in kernels if k.family == family and k.dtype == dtype]
        if not found:
            problems.append(f"{family} ({dtype}): not in the extension (built without 9.0a?)")
        for k in found:
            if k.counts["HGMMA"] == 0:
                problems.append(f"{family} ({dtype}): no HGMMA (wgmma) in its SASS")
            if k.counts["UTMALDG"] == 0:
                problems.append(f"{family} ({dtype}): no UTMALDG (TMA load) in its SASS")
            if k.local_bytes:
                problems.append(f"{family} ({dtype}): {k.local_bytes} bytes of local memory (spills)")
    return problems


def summary(kernels: list[Kernel]) -> list[str]:
    """The issue efficiency of each family's best bfloat16 kernel, against the hand-written fprop's."""
    best: dict[str, Kernel] = {}
    for k in kernels:
        ml = k.main_loop
        if k.dtype != "bfloat16" or ml is None or not ml.instructions:
            continue
        cur = best.get(k.family)
        if cur is None or ml.macs_per_warp / ml.instructions > cur.main_loop.macs_per_warp / cur.main_loop.instructions:
            best[k.family] = k
    ref = best.get("hand-written-fprop_tc")
    rate = lambda k: k.main_loop.macs_per_warp / k.main_loop.instructions  # noqa: E731
    lines = ["## Summary (bfloat16; the best tile of each family)", "",
             "| family | kernel | main loop: instr / MMAs | MACs per issued instruction | vs the hand-written fprop |",
             "| --- | --- | --- | ---: | ---: |"]
    for fam, k in sorted(best.items(), key=lambda kv: -rate(kv[1])):
        ml = k.main_loop
        vs = f"{rate(k) / rate(ref):.1f}x" if ref is not None else "-"
        lines.append(f"| {fam} | {k.name} | {ml.instructions} / {ml.mma} ({k.mma_shape.split(',')[0]}) | "
                     f"{rate(k):.0f} | {vs} |")
    return lines + ["", "A loop that issues fewer instructions per multiply-add leaves more issue slots to the tensor",
                    "cores; whether that turns into time is for a GPU run to say (none yet).", ""]


def markdown(kernels: list[Kernel], so: Path, toolchain: str) -> str:
    lines = [
        "# resconv CUDA C++ kernels on sm_90a: machine-code facts (no GPU)",
        "",
        f"Produced by `python benchmarks/sass_sm90.py` from `{so.name}` ({toolchain}). Read with cuobjdump;",
        "nothing here was run or timed. \"Main loop\" is the innermost loop holding the MMA instructions",
        "(for the warp-specialised Hopper kernels: the consumer warpgroup's; the producer's TMA loop",
        "is listed apart); \"MACs/instr\" is the multiply-adds one warp's MMAs perform per instruction it",
        "issues in that loop, the figure that bounds an issue-limited loop. Any speed drawn from these",
        "numbers is an estimate.",
        "",
    ] + summary(kernels) + [
        "## Every kernel",
        "",
        "| kernel | family | dtype | regs | spill (local B) | HGMMA | HMMA | UTMALDG | UTMASTG | LDGSTS | main loop: instr / MMAs | MACs/instr | producer loop: instr / UTMALDG |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for k in kernels:
        ml = k.main_loop
        loop = f"{ml.instructions} / {ml.mma}" if ml else "-"
        macs = f"{ml.macs_per_warp / ml.instructions:.0f}" if ml and ml.instructions else "-"
        pl = k.producer_loop
        prod = f"{pl.instructions} / {pl.mma}" if pl else "-"
        c = k.counts
        lines.append(f"| {k.name} | {k.family} | {k.dtype} | {k.registers} | {k.local_bytes} | {c['HGMMA']} | "
                     f"{c['HMMA']} | {c['UTMALDG']} | {c['UTMASTG']} | {c['LDGSTS']} | {loop} | {macs} | {prod} |")
    problems = check(kernels)
    lines += ["", "CI check (`--check`): " + ("passed: every Hopper kernel holds HGMMA and UTMALDG and none spills."
                                             if not problems else "FAILED: " + "; ".join(problems))]
    return "\n".join(lines) + "\n"


def toolchain_summary() -> str:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        nvcc = f"nvcc {m.group(1)}" if m else "nvcc ?"
    except OSError:
        nvcc = "nvcc ?"
    try:
        from importlib import metadata

        cutlass = f"nvidia-cutlass {metadata.version('nvidia-cutlass')}"
    except Exception:
        cutlass = "nvidia-cutlass ?"
    return f"{nvcc}, {cutlass}"


HAND_WRITTEN_SOURCES = ("conv_fprop_kernel.cu", "conv_dgrad_kernel.cu", "conv_wgrad_kernel.cu")


def build_baseline(rev: str, workdir: Path) -> list[Path]:
    """The hand-written tensor-core kernels of revision `rev`, compiled for sm_90a as resconv.build
    compiles them (its nvcc flags for ["9.0a"], without the Hopper files)."""
    import tarfile
    import io

    sys.path.insert(0, str(REPO))
    from resconv import build
    from torch.utils import cpp_extension

    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "csrc"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(workdir)
    csrc = workdir / "csrc"
    nvcc = str(Path(build.find_cuda_home() or "/usr/local/cuda") / "bin" / "nvcc")
    flags = ["-std=c++17", "-O3", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", f"-I{csrc}"]
    flags += [f for d in cpp_extension.include_paths(device_type="cuda") for f in ("-isystem", d)]
    flags += [f for d in build.wheel_include_dirs() for f in ("-isystem", d)]
    objs = []
    for name in HAND_WRITTEN_SOURCES:
        obj = workdir / (name + ".o")
        subprocess.run([nvcc, *flags, "-c", str(csrc / name), "-o", str(obj)], check=True, capture_output=True)
        objs.append(obj)
    return objs


def comparison(before: list[Kernel], after: list[Kernel], rev: str) -> str:
    """Markdown: the hand-written tensor-core kernels' main loops at `rev` and now."""
    old = {(k.name, k.dtype): k for k in before}
    lines = [f"## The hand-written tensor-core kernels: main loop at {rev} and now", "",
             "Instructions per warp in the innermost loop holding the MMAs (one pipeline stage: 64 bytes of the",
             "reduction per tile row), and registers; measured the same way on both builds.", "",
             "| kernel | dtype | regs before / now | main loop before / now (instr / MMAs) | MACs/instr before / now |",
             "| --- | --- | --- | --- | --- |"]
    for k in after:
        o = old.get((k.name, k.dtype))
        if o is None or not k.family.endswith("_tc") or o.main_loop is None or k.main_loop is None:
            continue
        b, a = o.main_loop, k.main_loop
        lines.append(f"| {k.name} | {k.dtype} | {o.registers} / {k.registers} | {b.instructions} / {b.mma} -> "
                     f"{a.instructions} / {a.mma} | {b.macs_per_warp / b.instructions:.0f} / "
                     f"{a.macs_per_warp / a.instructions:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", type=Path, default=None, help="the compiled extension (default: the 8.0;9.0a JIT build)")
    ap.add_argument("--out", type=Path, default=None, help="write sass_sm90.json and README.md into this folder")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every Hopper kernel holds HGMMA and UTMALDG")
    ap.add_argument("--baseline-rev", default=None,
                    help="also compile the hand-written kernels of this git revision and compare their main loops")
    args = ap.parse_args(argv)
    so = args.so or default_extension()
    kernels = analyse(so)
    text = markdown(kernels, so, toolchain_summary())
    if args.baseline_rev:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            before = [k for obj in build_baseline(args.baseline_rev, Path(tmp)) for k in analyse(obj)]
        text += "\n" + comparison(before, kernels, args.baseline_rev)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "README.md").write_text(text)
        (args.out / "sass_sm90.json").write_text(json.dumps([asdict(k) for k in kernels], indent=1) + "\n")
    print(text)
    if args.check:
        problems = check(kernels)
        for p in problems:
            print(f"sass_sm90: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
