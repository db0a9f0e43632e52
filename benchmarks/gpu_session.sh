#!/usr/bin/env bash
# One device call on a 2-GPU H100 host: TP=2 bench + test, then GPU tests on GPU 1 while GPU 0
# benchmarks TP=1 and runs the CPU suite's scheduling tests on CUDA (float32, so HF on CPU stays
# the oracle). Logs land in $OUT (or ./gpu-logs). Carry .whl/ (flash-attn + xxhash wheels).
#   bash benchmarks/gpu_session.sh
. "$(dirname "$0")/gpu_setup.sh"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
  timeout 100 python3 bench.py --tp 2 --json "$OUT/bench_tp2.json" 2>&1 | grep -E "^(Total|Config|Error)"
  timeout 150 $PYTEST tests/gpu -k tp2 2>&1 | tail -3 | tee "$OUT/pytest_tp2.log"
fi
last=$((ngpu - 1))
CUDA_VISIBLE_DEVICES=$last timeout ${CUDA_TESTS_S:-330} $PYTEST -m cuda tests/gpu tests/kernels tests/unit/test_sampler.py \
  tests/e2e/test_sampling_api.py > "$OUT/pytest_cuda.log" 2>&1 &
tests=$!
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench.py --json "$OUT/bench_tp1_flash.json" 2>&1 | grep -E "^(Total|Config|Error)"
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench.py --attention-backend triton --json "$OUT/bench_tp1_triton.json" 2>&1 | grep -E "^(Total|Config|Error)"
# #2's scheduling configurations and #9's invariance stress on CUDA (float32 checkpoints, graphs on)
CUDA_VISIBLE_DEVICES=0 timeout ${FP32_TESTS_S:-200} $PYTEST tests/models/test_hf_agreement.py tests/e2e/test_invariance.py \
  tests/e2e/test_interruption.py > "$OUT/pytest_fp32_cuda.log" 2>&1
tail -3 "$OUT/pytest_fp32_cuda.log"
wait $tests; grep -E "passed|failed|error" "$OUT/pytest_cuda.log" | tail -3
