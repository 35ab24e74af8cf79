#!/usr/bin/env bash
# The GPU check, one command on a lent machine (which reaches no package registry). Here, first:
#   bash bench/gpu_wheels.sh        # the wheels the machine's image lacks, into .whl/ (git-ignored)
# then on the machine (device tool: carry [".whl"]), well inside 8 minutes:
#   bash bench/gpu.sh               # GPU tests, GPU kernels, exports on the GPU, quickstart on CUDA
# Writes reports/gpu.json (and $OUT/gpu.json when $OUT is set).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD COMPRESSOR_HOME=/tmp/compressor-home PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 450 python3 bench/gpu.py ${OUT:+--out "$OUT/gpu.json"}
