#!/usr/bin/env bash
# Compile resconv's CUDA C++ extension (csrc/) for sm_80 and sm_90 with nvcc; no GPU needed.
# Any compile error fails the script (exit status != 0).
#
# Prerequisites: a CUDA build of PyTorch (torch.version.cuda set) with resconv importable
# (pip install -e .), ninja (pip install ninja) and a CUDA toolkit with nvcc (CUDA_HOME, or
# /usr/local/cuda, or nvcc on PATH). PyTorch's CUDA wheels supply the cuBLAS/cuSPARSE headers
# a bare toolkit may lack (site-packages/nvidia/cu*/include), found automatically.
#
# It runs the same just-in-time build the first use on a GPU would run, into the same cache
# folder ($RESCONV_BUILD_DIR, else ~/.cache/resconv/cuda_ext/...), so tests that load the
# extension afterwards reuse it instead of compiling again.
#
# Usage: .ci/compile_cuda.sh [--ptxas-verbose] [--force]   (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
start=$(date +%s)
"$PYTHON" -m resconv build --arch "$TORCH_CUDA_ARCH_LIST" "$@"
echo "compile_cuda.sh: compiled for $TORCH_CUDA_ARCH_LIST in $(( $(date +%s) - start )) s"
