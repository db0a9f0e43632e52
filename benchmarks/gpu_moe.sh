#!/usr/bin/env bash
# One device call on one H200 for the mixture-of-experts path (docs/moe.md): the fused-MoE
# kernel and engine CUDA tests, the micro-benchmark at Qwen3-30B-A3B's shapes with its tile
# sweep, then (with --e2e) bench.py on a random-weight Qwen3-30B-A3B. Logs land in $OUT (or
# ./gpu-logs).
#   bash benchmarks/gpu_moe.sh [--e2e]
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout "${MOE_TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider -m cuda -s tests/kernels/test_fused_moe.py \
  tests/gpu/test_moe_engine.py > "$out/pytest_moe.log" 2>&1
grep -E "oracle agreement|passed|failed|Error" "$out/pytest_moe.log" | tail -8
timeout "${MOE_BENCH_S:-200}" python3 benchmarks/fused_moe.py --sweep 2>&1 | tee "$out/fused_moe.txt"
if [ "${1:-}" = --e2e ]; then
  timeout "${MOE_E2E_S:-300}" python3 bench.py --model-config qwen3-30b-a3b --json "$out/moe_e2e.json" 2>&1 \
    | grep -v Warning | tee "$out/moe_e2e.txt"
fi
