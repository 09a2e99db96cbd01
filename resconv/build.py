"""Building and loading the CUDA C++ extension ``resconv._C`` (sources in ``csrc/``).

Three ways to get it:

* just in time: the first call that needs it on a CUDA tensor compiles it with
  ``torch.utils.cpp_extension.load`` (ninja, cached under ``~/.cache/resconv``; a message
  says it is compiling and for which architectures);
* ``resconv build`` (:mod:`resconv.build_cli`): the same compilation, on demand (no GPU needed);
* ahead of time: ``RESCONV_BUILD_CUDA=1 pip install --no-build-isolation .`` (setup.py
  calls :func:`setup_kwargs`).

Whether a build is possible is decided from ``torch.version.cuda`` and the CUDA toolkit
(``CUDA_HOME``), never from ``torch.cuda.is_available()``. Architectures come from
``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``, ``"9.0a"``, ``"8.6+PTX"``), default sm_80 and
sm_90; the kernels need 8.0 or newer.

Environment: ``RESCONV_BUILD_DIR`` (JIT build folder), ``RESCONV_CUDA_JIT=0`` (never compile
at run time: only an ahead-of-time build is used).

This module imports nothing from resconv and imports torch only inside functions, so that
setup.py can load it as a plain file without importing the package.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

LOG = logging.getLogger("resconv")
EXT_NAME = "resconv_C"  # JIT module name (the ahead-of-time build is resconv._C)
DEFAULT_ARCHS = ("8.0", "9.0")
MIN_ARCH = (8, 0)  # cp.async and bf16/tf32 mma.sync
# Named architectures as TORCH_CUDA_ARCH_LIST accepts them (only those resconv can run on).
NAMED_ARCHS = {"Ampere": ("8.0", "8.6"), "Ada": ("8.9",), "Hopper": ("9.0",)}
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)(a?)(\+PTX)?$")


# ------------------------------------------------------------------------------------------
# toolchain and flags
# ------------------------------------------------------------------------------------------
def csrc_dir() -> Path:
    """The C++/CUDA sources: ``resconv/csrc`` in an installed wheel, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    raise FileNotFoundError(f"resconv's CUDA sources (csrc/) were not found next to {here}")


def source_files(csrc: Optional[Path] = None) -> list[Path]:
    csrc = csrc or csrc_dir()
    return sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.cu"))


def parse_arch_list(value: Optional[str]) -> list[str]:
    """Architectures from a ``TORCH_CUDA_ARCH_LIST``-style string (None or empty: the default).

    Entries are separated by ``;``, ``,`` or spaces: ``"8.0"``, ``"9.0a"`` (Hopper-only
    instructions), ``"8.6+PTX"`` (also embed PTX), or a name (Ampere, Ada, Hopper).

    Raises:
        ValueError: an entry that is not an architecture, or one older than 8.0.
    """
    if value is None or not value.strip():
        return list(DEFAULT_ARCHS)
    out: list[str] = []
    for tok in re.split(r"[;,\s]+", value.strip()):
        if not tok:
            continue
        names = NAMED_ARCHS.get(tok)
        for arch in names if names is not None else (tok,):
            m = _ARCH_RE.match(arch)
            if m is None:
                raise ValueError(
                    f"TORCH_CUDA_ARCH_LIST: {arch!r} is not an architecture (expected e.g. '8.0', '9.0a', "
                    f"'8.6+PTX' or one of {sorted(NAMED_ARCHS)})"
                )
            if (int(m.group(1)), int(m.group(2))) < MIN_ARCH:
                raise ValueError(
                    f"TORCH_CUDA_ARCH_LIST: {arch!r} is older than sm_80; resconv's kernels need compute "
                    f"capability 8.0 or newer (cp.async, bf16/TF32 tensor cores)"
                )
            if arch not in out:
                out.append(arch)
    if not out:
        return list(DEFAULT_ARCHS)
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for each architecture, plus PTX for ``+PTX`` entries."""
    flags = []
    for arch in archs:
        m = _ARCH_RE.match(arch)
        assert m is not None, arch
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def arch_names(archs: list[str]) -> str:
    return ", ".join("sm_" + a.replace(".", "").replace("+PTX", " (+PTX)") for a in archs)


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit: ``CUDA_HOME`` / ``CUDA_PATH``, else the nvcc on PATH, else /usr/local/cuda.

    A candidate counts only when it has ``bin/nvcc`` and ``include/cuda_runtime.h`` (an nvcc
    wrapper script in /usr/local/bin does not make /usr/local a toolkit).
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return str(Path(c))
    return None


def toolchain_problem() -> Optional[str]:
    """Why the extension cannot be compiled here (None when it can). Queries no GPU."""
    import torch

    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support (torch.version.cuda is None)"
    if find_cuda_home() is None:
        return "no CUDA toolkit found: set CUDA_HOME to a CUDA installation with bin/nvcc"
    return None


def wheel_include_dirs() -> list[str]:
    """Include folders of the NVIDIA CUDA wheels that PyTorch installs.

    Some toolkit installations lack the cuBLAS/cuSPARSE headers that PyTorch's CUDA headers
    include; the wheels have them. They go last in the search path (-isystem), so they only
    supply headers the toolkit does not have.
    """
    import torch

    major = (torch.version.cuda or "").split(".")[0]
    out = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        for sub in (f"cu{major}/include", "cublas/include", "cusparse/include"):
            d = base / sub
            if d.is_dir() and str(d) not in out:
                out.append(str(d))
    return out


def build_flags(archs: list[str], ptxas_verbose: bool = False) -> dict[str, list[str]]:
    """Compiler flags for the host compiler ("cxx") and nvcc ("nvcc")."""
    isystem = [f for d in wheel_include_dirs() for f in ("-isystem", d)]
    cxx = ["-O3"] + isystem
    nvcc = ["-O3", "-lineinfo"] + gencode_flags(archs) + isystem
    if ptxas_verbose:
        nvcc.append("-Xptxas=-v")
    return {"cxx": cxx, "nvcc": nvcc}


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning:
    building without a GPU is what resconv's build is for."""
    log = logging.getLogger("torch.utils.cpp_extension")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(old)
    return cpp_extension


def _use_cuda_home(cuda_home: str) -> None:
    """Point torch.utils.cpp_extension at the toolkit found here (torch guesses from the nvcc
    on PATH, which can be a wrapper outside the toolkit)."""
    _cpp_extension().CUDA_HOME = cuda_home


def default_build_dir(archs: list[str], ptxas_verbose: bool = False) -> Path:
    import torch

    if os.environ.get("RESCONV_BUILD_DIR"):
        return Path(os.environ["RESCONV_BUILD_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = "-".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs)
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    name = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-{py}-{tag}"
    return cache / "resconv" / "cuda_ext" / (name + ("-ptxas" if ptxas_verbose else ""))


def _cached_build_is_fresh(build_dir: Path, sources: list[Path]) -> bool:
    libs = list(build_dir.glob(f"{EXT_NAME}*.so"))
    if not libs:
        return False
    csrc = sources[0].parent
    headers = list(csrc.glob("*.h")) + list(csrc.glob("*.cuh"))
    newest_src = max(p.stat().st_mtime for p in sources + headers)
    return max(p.stat().st_mtime for p in libs) >= newest_src


# ------------------------------------------------------------------------------------------
# just-in-time build and loading
# ------------------------------------------------------------------------------------------
def jit_build(archs: Optional[list[str]] = None, *, build_dir: Optional[Path] = None, force: bool = False,
              verbose: bool = False, ptxas_verbose: bool = False):
    """Compile (or load from the cache) the extension with torch.utils.cpp_extension.load.

    Returns the loaded module; raises RuntimeError (no toolchain) or the compiler's error.
    """
    problem = toolchain_problem()
    if problem is not None:
        raise RuntimeError(problem)
    cpp_extension = _cpp_extension()
    _use_cuda_home(find_cuda_home())  # type: ignore[arg-type]
    archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST")) if archs is None else archs
    build_dir = Path(build_dir) if build_dir is not None else default_build_dir(archs, ptxas_verbose)
    build_dir.mkdir(parents=True, exist_ok=True)
    if force:
        for p in list(build_dir.glob("*.o")) + list(build_dir.glob("*.so")) + list(build_dir.glob(".ninja*")):
            p.unlink()
    srcs = source_files()
    fresh = _cached_build_is_fresh(build_dir, srcs)
    action = "loading the cached" if fresh else "compiling the"
    LOG.log(logging.DEBUG if fresh else logging.WARNING, "%s CUDA C++ extension resconv._C for %s in %s%s", action,
            arch_names(archs), build_dir, "" if fresh else " (once; this takes a few minutes)")
    flags = build_flags(archs, ptxas_verbose)
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[str(p) for p in srcs],
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        extra_include_paths=[str(srcs[0].parent)],
        build_directory=str(build_dir),
        with_cuda=True,
        verbose=verbose,
    )


_lock = threading.Lock()
_state: dict = {"module": None, "error": None}


def load_extension():
    """``resconv._C``: the ahead-of-time build if installed, else a just-in-time build.

    The outcome (module or error) is remembered for the process. Raises the build or import
    error when the extension cannot be had.
    """
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        if _state["error"] is not None:
            raise _state["error"]
        try:
            mod = _import_or_build()
        except Exception as e:  # remembered: the cuda backend reports it as its cause
            _state["error"] = e
            raise
        sys.modules["resconv._C"] = mod
        pkg = sys.modules.get("resconv")
        if pkg is not None:
            pkg._C = mod  # type: ignore[attr-defined]
        _state["module"] = mod
        return mod


def loaded_extension():
    """The extension if it is already loaded in this process, else None (never builds)."""
    return _state["module"]


def _import_or_build():
    import importlib

    aot_error: Optional[BaseException] = None
    try:
        return importlib.import_module("resconv._C")
    except ImportError as e:
        if e.name != "resconv._C":  # present but broken (e.g. built for another torch)
            aot_error = e
    if os.environ.get("RESCONV_CUDA_JIT", "1") == "0":
        raise RuntimeError(
            "the CUDA extension is not built ahead of time and RESCONV_CUDA_JIT=0 forbids compiling it now"
            + (f" (importing resconv._C failed: {aot_error})" if aot_error else "")
        ) from aot_error
    return jit_build()


# ------------------------------------------------------------------------------------------
# ahead-of-time build (setup.py)
# ------------------------------------------------------------------------------------------
def setup_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup() when RESCONV_BUILD_CUDA=1."""
    problem = toolchain_problem()
    if problem is not None:
        raise RuntimeError(f"RESCONV_BUILD_CUDA=1: cannot build the CUDA extension: {problem}")
    cpp_extension = _cpp_extension()
    BuildExtension, CUDAExtension = cpp_extension.BuildExtension, cpp_extension.CUDAExtension
    _use_cuda_home(find_cuda_home())  # type: ignore[arg-type]
    archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    csrc = csrc_dir()
    root = csrc.parent
    print(f"resconv: building the CUDA C++ extension resconv._C for {arch_names(archs)}", file=sys.stderr)
    ext = CUDAExtension(
        name="resconv._C",
        sources=[str(p.relative_to(root)) for p in source_files(csrc)],
        include_dirs=[str(csrc)],
        extra_compile_args=build_flags(archs),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
