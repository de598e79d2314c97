#!/usr/bin/env bash
# Install rectok_fast and everything it needs into ./.venv, from nothing (pip only: the machine's
# local wheel folders hold the torch 2.14.1 CUDA build, which uv/poetry would not see).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
$PIP install torch==2.14.1 torchvision==0.29.1 numpy
# DeepSpeed compiles its CPU ops on first use (JIT); building them at install time is not needed.
DS_BUILD_OPS=0 $PIP install --no-build-isolation deepspeed==0.19.8
$PIP install nvidia-dali-cuda130==2.4.0 timm==1.0.31 einops pillow scikit-image tqdm safetensors torch-fidelity==0.4.0 \
    matplotlib tensorboard pytest pytest-benchmark
# CUDA_HOME: torch guesses /usr/local from the nvcc wrapper, which is wrong here.
# TORCH_CUDA_ARCH_LIST: no GPU to detect; 9.0 = H100/H200. The CUDA kernels are compiled (not run) on CPU machines.
if [ -d /usr/local/cuda ]; then export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
$PIP install --no-build-isolation --no-deps -e .
.venv/bin/python -m rectok_fast.env_report || true
