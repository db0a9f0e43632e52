#!/usr/bin/env bash
# One device call for overlap scheduling (#12), on a 2-GPU H100 host: TP=1 with overlap on
# and off, TP=2, a host-side profile, then the overlap and bf16 GPU tests beside the TP=2 run.
# Carry .whl/ (flash-attn + xxhash wheels).   bash benchmarks/gpu_overlap.sh
. "$(dirname "$0")/gpu_setup.sh"
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
