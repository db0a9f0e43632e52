#!/usr/bin/env bash
# One device call: install, GPU tests, benchmarks. Logs land in $OUT (or ./gpu-logs).
# Usage on a 2-GPU H100 machine, from the repo root, with .whl/ carried (flash-attn + xxhash wheels):
#   bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, flash_attn, triton; print(torch.__version__, flash_attn.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
# the random-weight Qwen3-0.6B checkpoint, made once
timeout 120 python3 -c "import bench; print(bench.default_model_dir())"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
# GPU tests on the last GPU while GPU 0 benchmarks
CUDA_VISIBLE_DEVICES=$((ngpu - 1)) timeout 400 python3 -m pytest -q -x -m cuda tests/gpu tests/kernels tests/unit/test_sampler.py \
  tests/e2e/test_sampling_api.py -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1 &
tests=$!
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench.py --json "$OUT/bench_tp1_flash.json" 2>&1 | grep -v "^Generating" | tail -3
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench.py --attention-backend triton --json "$OUT/bench_tp1_triton.json" 2>&1 | grep -v "^Generating" | tail -3
wait $tests; tail -3 "$OUT/pytest_cuda.log"
if [ "$ngpu" -ge 2 ]; then
  timeout 150 python3 bench.py --tp 2 --json "$OUT/bench_tp2_flash.json" 2>&1 | grep -v "^Generating" | tail -3
  timeout 150 python3 -m pytest -q tests/gpu -k tp2 -p no:cacheprovider 2>&1 | tail -2 | tee "$OUT/pytest_tp2.log"
fi
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/profile_step.py > "$OUT/profile_step.log" 2>&1; head -20 "$OUT/profile_step.log"
