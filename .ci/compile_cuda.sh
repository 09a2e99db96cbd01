#!/usr/bin/env bash
# Compile resconv's CUDA C++ extension (csrc/) with nvcc for sm_80 and sm_90a (the hand-written
# kernels for both, and the Hopper kernels, CUTLASS 3 sm90 with wgmma + TMA, for sm_90a); then
# check the Hopper kernels' machine code: every one (fprop in its three epilogue variants,
# dgrad, wgrad; float16 and bfloat16) must hold HGMMA (wgmma) and UTMALDG (TMA loads) and must
# not spill (benchmarks/sass_sm90.py --check). No GPU needed. Any compile error or failed
# check fails the script (exit status != 0).
#
# Prerequisites: a CUDA build of PyTorch (torch.version.cuda set) with resconv importable
# (pip install -e ".[cuda]": ninja, and nvidia-cutlass for the CUTLASS headers), a CUDA toolkit
# with nvcc (CUDA_HOME, or /usr/local/cuda, or nvcc on PATH), and cuobjdump (the toolkit's, or
# the triton wheel's). PyTorch's CUDA wheels supply the cuBLAS/cuSPARSE headers a bare toolkit
# may lack (site-packages/nvidia/cu*/include), found automatically.
#
# It runs the same just-in-time build the first use on a GPU would run, into the same cache
# folder ($RESCONV_BUILD_DIR, else ~/.cache/resconv/cuda_ext/...), so tests that load the
# extension afterwards with the same TORCH_CUDA_ARCH_LIST reuse it instead of compiling again.
#
# Usage: .ci/compile_cuda.sh [--ptxas-verbose] [--force]   (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
start=$(date +%s)
"$PYTHON" -m resconv build --arch "$TORCH_CUDA_ARCH_LIST" "$@"
echo "compile_cuda.sh: compiled for $TORCH_CUDA_ARCH_LIST in $(( $(date +%s) - start )) s"
case ";$TORCH_CUDA_ARCH_LIST;" in
  *";9.0a;"*|*";9.0a+PTX;"*)
    SO=$("$PYTHON" -c "from resconv.ops import cuda; cuda.ops(); from resconv import build; print(build.loaded_extension().__file__)" 2>/dev/null | tail -1)
    "$PYTHON" benchmarks/sass_sm90.py --so "$SO" --check > /dev/null
    echo "compile_cuda.sh: the sm_90a Hopper kernels hold HGMMA and UTMALDG, no spills ($SO)";;
esac
