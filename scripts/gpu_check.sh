#!/usr/bin/env bash
# GPU check of the TensorRT path: Triton kernels (and the fused head) on CUDA vs the PyTorch reference (timed),
# TensorRT engines (pddnet build) for the precision graphs with their latency at 192x160x256
# (FP16 target < 15 ms on an H100-class GPU), and validation of the TensorRT backend.
# Degrades gracefully: every section that cannot run here says why and is skipped; the summary
# lists what ran. Exit status 1 only when a check that ran failed. See docs/tensorrt.md.
#
#   scripts/gpu_check.sh [--checkpoint CKPT] [--fp16 G.onnx] [--int8 G.onnx] [--data DIR]
#                        [--cuda-graph] [--skip-kernels] [--work DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import pddnet' 2>/dev/null; then
  echo "gpu_check: pddnet is not importable with $PY; run 'make setup' (and pip install '.[gpu]')" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found: no NVIDIA driver here; the GPU sections will be skipped"
fi
exec "$PY" scripts/gpu_check.py "$@"
