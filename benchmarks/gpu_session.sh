#!/usr/bin/env bash
# One device call on a 2-GPU H100 host: TP=2 bench + test, then GPU tests on GPU 1 while GPU 0
# benchmarks TP=1 and runs the CPU suite's scheduling tests on CUDA (float32, so HF on CPU stays
# the oracle). Logs land in $OUT (or ./gpu-logs). Carry .whl/ (flash-attn + xxhash wheels).
#   bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, flash_attn, triton; print(torch.__version__, flash_attn.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -c "import bench; print(bench.default_model_dir())"   # the random Qwen3-0.6B, once
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
PYTEST="python3 -m pytest -q -p no:cacheprovider"
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
