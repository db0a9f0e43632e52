#!/usr/bin/env bash
# A short device call: fused-kernel GPU tests, bench with fused kernels, oracle agreement, A/B bench.
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
timeout 45 python3 -m pytest -q -m cuda tests/kernels/test_fused_kernels.py -p no:cacheprovider 2>&1 | tail -2
timeout 100 python3 bench.py 2>&1 | grep -E "^(Total|Config)" | tee "$OUT/bench_fused.txt"
timeout 90 python3 -m pytest -q -x tests/gpu -k "False-flash" -p no:cacheprovider 2>&1 | tail -3
NANOVLLM_FUSED_KERNELS=0 timeout 60 python3 bench.py 2>&1 | grep -E "^(Total|Config)" | tee "$OUT/bench_unfused.txt"
