#!/usr/bin/env bash
# One-step install of hf_dtgma and its test dependencies into the current Python environment.
# Without an NVIDIA GPU it installs PyTorch's CPU build first (the default PyPI wheel brings several GB of CUDA
# libraries a CPU machine never uses); with one, pip's default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "$PYTHON" -m pip install "torch>=2.4"
    else
        "$PYTHON" -m pip install --retries 1 "torch==2.13.*" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"$PYTHON" -m pip install -e ".[dev]"
