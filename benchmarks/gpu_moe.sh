#!/usr/bin/env bash
# One device call on one H200 for the mixture-of-experts path (docs/moe.md): the fused-MoE
# kernel and engine CUDA tests, then the micro-benchmark at Qwen3-30B-A3B's shapes with its
# tile sweep. Logs land in $OUT (or ./gpu-logs). End to end: bench.py --model-config qwen3-30b-a3b.
#   bash benchmarks/gpu_moe.sh
. "$(dirname "$0")/gpu_setup.sh"
timeout ${MOE_TESTS_S:-300} $PYTEST -m cuda -s tests/kernels/test_fused_moe.py tests/gpu/test_moe_engine.py \
  > "$OUT/pytest_moe.log" 2>&1
grep -E "oracle agreement|passed|failed|Error" "$OUT/pytest_moe.log" | tail -8
timeout ${MOE_BENCH_S:-200} python3 benchmarks/fused_moe.py --sweep 2>&1 | tee "$OUT/fused_moe.txt" | tail -8
