#!/usr/bin/env bash
# The GPU check of issue 16 (see benchmarks/gpu_check.py): one prepared run, <= 8 minutes on one H100/H200,
# offline. Without CUDA it runs the short CPU fallback and says so. Writes benchmarks/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout -k 10 480 python benchmarks/gpu_check.py "$@"
