#!/usr/bin/env bash
# One command on a GPU machine: install resconv, build the CUDA extension, run the GPU tests
# and the benchmark suite, all inside one time budget, writing every result file into OUTDIR.
#
#   benchmarks/run_gpu.sh OUTDIR
#
# Budget (seconds; environment variables override):
#   RESCONV_GPU_TOTAL_S  570  whole script (the device tool stops a command at 600 s)
#   RESCONV_GPU_BUILD_S  150  `resconv build` (CUDA extension, for this GPU's architecture only)
#   RESCONV_GPU_TEST_S   120  pytest -m "gpu or cuda_ext"
#   the suite gets what is left, less a 40 s reserve for finishing the job in flight and
#   writing the report; what it could not reach is listed in results.md ("Not run").
# Switches: RESCONV_GPU_SKIP_BUILD=1, RESCONV_GPU_SKIP_TESTS=1 (e.g. for a second call that
# only benchmarks), RESCONV_BENCH_ARGS="..." (extra `resconv bench` arguments, e.g.
# "--sections layers --batches 32,1"), PYTHON (default python3).
#
# OUTDIR receives at most 7 files, none in subfolders: run.log (everything, with versions
# and nvidia-smi), build.log, pytest.log, results.json, results.md, layers.png, e2e.png.
# No registry is needed: the install uses the packages already on the machine.
set -u -o pipefail

OUT=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${RESCONV_GPU_TOTAL_S:-570}
BUILD_S=${RESCONV_GPU_BUILD_S:-150}
TEST_S=${RESCONV_GPU_TEST_S:-120}
RESERVE=40
export PYTHONUNBUFFERED=1
T0=$(date +%s)

elapsed() { echo $(($(date +%s) - T0)); }
log() { echo "[run_gpu $(elapsed)s] $*" | tee -a "$OUT/run.log"; }
left() { echo $((TOTAL - $(elapsed))); }

log "repository $(pwd), output $OUT, budget ${TOTAL}s"
if command -v nvidia-smi >/dev/null; then nvidia-smi >>"$OUT/run.log" 2>&1; else log "nvidia-smi: not found"; fi
$PY - >>"$OUT/run.log" 2>&1 <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
EOF

# 1. Install (editable, no dependencies fetched, no isolated build environment).
log "install: $PY -m pip install --no-deps --no-build-isolation -e ."
if ! $PY -m pip install --no-deps --no-build-isolation -e . >>"$OUT/run.log" 2>&1; then
    log "install FAILED (see run.log); falling back to the source tree on PYTHONPATH"
fi
if ! $PY -c "import resconv.triton_kernels" >>"$OUT/run.log" 2>&1; then
    # The kernels folder is installed as resconv.triton_kernels; from the source tree it needs a link.
    [ -e resconv/triton_kernels ] || ln -s ../triton_kernels resconv/triton_kernels
    export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. Build the CUDA extension, when the project has the entry point (resconv/build.py).
if [ "${RESCONV_GPU_SKIP_BUILD:-0}" = 1 ]; then
    log "build: skipped (RESCONV_GPU_SKIP_BUILD=1)"
elif $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('resconv.build') is None)" 2>/dev/null; then
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU's architecture only: half the compile time
        TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
        [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST
    fi
    log "build: $PY -m resconv build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}, at most ${BUILD_S}s)"
    timeout -k 10 "$BUILD_S" $PY -m resconv build >"$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        log "build: ok"
    else
        [ $rc -eq 124 ] && why="timed out after ${BUILD_S}s" || why="exit code $rc"
        log "build: FAILED ($why; tail of build.log below). The cuda backend is reported unavailable."
        tail -n 25 "$OUT/build.log" | tee -a "$OUT/run.log"
        export RESCONV_CUDA_JIT=0  # no second attempt to compile inside the tests or the suite
    fi
else
    log "build: no build entry point (resconv/build.py) in this version: resconv-cuda is reported unavailable"
    echo "no resconv.build module in this version" >"$OUT/build.log"
fi

# 3. GPU tests.
if [ "${RESCONV_GPU_SKIP_TESTS:-0}" = 1 ]; then
    log "tests: skipped (RESCONV_GPU_SKIP_TESTS=1)"
else
    t=$TEST_S
    [ "$(left)" -lt $((t + RESERVE + 120)) ] && t=$(($(left) - RESERVE - 120))
    if [ "$t" -gt 10 ]; then
        log "tests: pytest -m \"gpu or cuda_ext\" (at most ${t}s)"
        # SIGINT on timeout: pytest stops and still prints what passed and failed.
        timeout -s INT -k 15 "$t" $PY -m pytest -m "gpu or cuda_ext" -q -rfEs --durations=15 -p no:cacheprovider \
            tests >"$OUT/pytest.log" 2>&1
        rc=$?
        log "tests: exit code $rc ($( { grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/pytest.log" || true; } | tail -n 1))"
        [ $rc -eq 124 ] && log "tests: stopped at the time limit; see pytest.log"
    else
        log "tests: no time left"
    fi
fi

# 4. The benchmark suite, in the time that is left.
budget=$(($(left) - RESERVE))
if [ "$budget" -lt 30 ]; then
    log "bench: no time left (${budget}s)"
    exit 1
fi
log "bench: $PY -m resconv bench --out $OUT --time-budget $budget ${RESCONV_BENCH_ARGS:-}"
# shellcheck disable=SC2086
timeout -s INT -k 10 $((budget + RESERVE - 15)) $PY -m resconv bench --out "$OUT" --time-budget "$budget" \
    --no-progress ${RESCONV_BENCH_ARGS:-} 2>&1 | tee -a "$OUT/run.log"
rc=$?
log "bench: exit code $rc"
rm -f "$OUT/results.json.tmp"
if [ -f "$OUT/results.json" ] && [ ! -f "$OUT/results.md" ]; then
    log "bench: stopped before its report; rendering the partial results"
    timeout 30 $PY -m resconv bench --report "$OUT/results.json" >>"$OUT/run.log" 2>&1
fi
log "done: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
