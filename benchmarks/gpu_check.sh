#!/usr/bin/env bash
# The GPU check in one command: DiT-B/2 bf16 training (batch 32/256, eager/compiled, MFU, SDPA kernel, memory),
# DDPM-250 / Heun-50 sampling, the latent loader into the GPU, and the CUDA-only tests -> results/gpu_check.json.
# Random weights, no network. Installs nothing beyond `make install` (run only when the venv lacks the stack).
#   bash benchmarks/gpu_check.sh [--out PATH] [--quick] [--phases train sampling loader tests]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no device); run this on a CUDA machine" >&2
    exit 2
fi
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import torch, lightning, hydra, diffusers" >/dev/null 2>&1; then
    make install
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
exec "$PYTHON" benchmarks/gpu_check.py "$@"
