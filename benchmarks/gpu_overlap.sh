#!/usr/bin/env bash
# One device call for overlap scheduling (#12), on a 2-GPU H100 host: TP=1 with overlap on
# and off, TP=2, a host-side profile, then the overlap and bf16 GPU tests beside the TP=2 run.
# Carry .whl/ (flash-attn + xxhash wheels).   bash benchmarks/gpu_overlap.sh
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 -c "import bench; print(bench.default_model_dir())" | tail -1
PYTEST="python3 -m pytest -q -p no:cacheprovider"
B() { timeout 100 python3 bench.py "$@" 2>&1 | grep -E "^(Total|Config|Error|Traceback)"; }
export CUDA_VISIBLE_DEVICES=0
B --json "$OUT/bench_tp1_overlap.json"
B --no-overlap --json "$OUT/bench_tp1_sync.json"
timeout 100 python3 benchmarks/profile_step.py --host --no-kernels > "$OUT/profile_host.log" 2>&1; tail -12 "$OUT/profile_host.log"
unset CUDA_VISIBLE_DEVICES
B --tp 2 --json "$OUT/bench_tp2_overlap.json"
B --tp 2 --no-overlap
CUDA_VISIBLE_DEVICES=1 timeout 200 $PYTEST tests/e2e/test_overlap.py tests/gpu -k "not tp2" > "$OUT/pytest_gpu.log" 2>&1
tail -4 "$OUT/pytest_gpu.log"
timeout 120 $PYTEST tests/gpu -k tp2 2>&1 | tail -2
