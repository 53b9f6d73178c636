#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh [OUT.json] [gpu_check.py options]
# The paper's sizes on one GPU in at most 8 minutes (benchmarks/gpu_check.py says what it measures); the numbers go
# to OUT.json (default gpu_check.json). On a CPU, `--tiny` runs the same code at tiny shapes, as the test does.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
shift || true
export TOKENIZERS_PARALLELISM=false
exec timeout 480 "${PYTHON:-python}" benchmarks/gpu_check.py --out "$out" "$@"
