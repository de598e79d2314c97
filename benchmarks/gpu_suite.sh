#!/usr/bin/env bash
# One-call GPU suite (H200 or any CUDA GPU). Builds the extension, checks every fused op against the
# reference ON THE GPU, then times fused vs eager vs torch.compile(reference) and writes JSON with the
# GPU name, versions, p20/p50/p80 and fractions of a copy / bf16 matmul measured in the same run.
#
#   bash benchmarks/gpu_suite.sh            # results -> benchmarks/results/<gpu>-<date>/ (and $OUT if set)
#
# Budget: at most ~7.5 minutes by construction (build, 150 s of GPU correctness checks, 460 s of benchmarks);
# typically much less.
# Uses the machine's python3 (its torch/triton); nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8}
export HF_HUB_OFFLINE=1 RECTOK_FAST_QUIET=1 RECTOK_TEST_DEVICE=cuda
export TRITON_INTERPRET=0   # compiled kernels, never the interpreter
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo unknown)
res="benchmarks/results/${gpu}-$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$res"
log() { echo "[gpu_suite $(date -u +%T)] $*" | tee -a "$res/suite.log"; }

log "build: editable install with the extension (sm_${TORCH_CUDA_ARCH_LIST})"
t0=$(date +%s)
# --no-deps: the machine's own torch/triton are used as they are (nothing can be fetched there).
$PY -m pip install --no-build-isolation --no-deps -e . >"$res/build.log" 2>&1 \
    || log "install/build FAILED (see build.log)"
$PY -c "import rectok_fast.kernels" >>"$res/suite.log" 2>&1 || log "rectok_fast.kernels does not import"
log "build: $(( $(date +%s) - t0 )) s"
$PY -m rectok_fast.env_report >"$res/env_report.txt" 2>&1 || true

log "correctness on the GPU (fused vs reference)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_adaln.py \
    >"$res/correctness.log" 2>&1; rc=$?
log "correctness rc=$rc ($(tail -1 "$res/correctness.log"))"

# One pytest session per suite, each with its own JSON and time limit, so a slow suite (the real-shape
# training steps compile large models) cannot take the others' results with it.
per_test=""
$PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=150"   # a hung test fails alone
bench() {  # name, time limit (s), test files...
    local name=$1 limit=$2; shift 2
    log "benchmarks: $name"
    timeout "$limit" $PY -m pytest -q -p no:cacheprovider $per_test "$@" --benchmark-only \
        --benchmark-min-rounds=10 --benchmark-max-time=0.3 --benchmark-warmup=on --benchmark-save-data \
        --benchmark-json="$res/bench_$name.json" >"$res/bench_$name.log" 2>&1
    log "benchmarks: $name rc=$? ($(tail -1 "$res/bench_$name.log"))"
}
bench kernels 170 benchmarks/test_bench_kernels.py
bench adaln 90 benchmarks/test_bench_adaln.py
bench train 200 benchmarks/test_bench_train.py
$PY benchmarks/summarize.py "$res"/bench_*.json >"$res/summary.md" 2>>"$res/suite.log" || true
cat "$res/summary.md" 2>/dev/null | head -120
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp -r "$res" "$OUT/results/"; fi
log "done: $res"
