#!/usr/bin/env bash
# The closing device call on a 2-GPU H100 host: every cuda-marked test (GPU 1) beside the
# TP=1 benchmarks (GPU 0: default, triton, FP8 KV, token budgets, HF baseline), then the
# TP=2 tests (oracle agreement, dead worker on NCCL) and TP=2 benches. Carry .whl/.
#   bash benchmarks/gpu_final.sh
. "$(dirname "$0")/gpu_setup.sh"
B() { timeout 150 python3 bench.py "$@" 2>&1 | grep -E "^(Total|Config|Error|Traceback|WARNING)"; }
( export CUDA_VISIBLE_DEVICES=1
  timeout 330 $PYTEST -s -m cuda tests/gpu tests/kernels tests/unit/test_sampler.py tests/e2e/test_sampling_api.py \
    > "$OUT/pytest_cuda.log" 2>&1
  timeout 150 $PYTEST tests/e2e/test_overlap.py tests/models/test_hf_agreement.py > "$OUT/pytest_fp32_cuda.log" 2>&1
) &
tests=$!
export CUDA_VISIBLE_DEVICES=0
B --json "$OUT/bench_tp1.json"
B --kv-cache-dtype fp8 --json "$OUT/bench_tp1_fp8.json"
B --attention-backend triton
B --max-num-batched-tokens 4096 --json "$OUT/bench_tp1_budget4k.json"
timeout 200 python3 bench.py --backend hf --num-seqs 16 2>&1 | grep -E "^(Total|Config|Error)"
wait $tests
grep -E "passed|failed" "$OUT/pytest_cuda.log" | tail -2; grep -E "^FAILED|agreement|fp8 KV" "$OUT/pytest_cuda.log"
grep -E "passed|failed" "$OUT/pytest_fp32_cuda.log" | tail -2; grep -E "^FAILED" "$OUT/pytest_fp32_cuda.log"
unset CUDA_VISIBLE_DEVICES
timeout 200 $PYTEST -s tests/gpu/test_cuda_engine.py::test_tp2_agrees_with_oracle tests/e2e/test_tensor_parallel.py > "$OUT/pytest_tp2.log" 2>&1
grep -E "passed|failed" "$OUT/pytest_tp2.log" | tail -2; grep -E "^FAILED|agreement" "$OUT/pytest_tp2.log"
B --tp 2 --kv-cache-dtype fp8 --json "$OUT/bench_tp2_fp8.json"
