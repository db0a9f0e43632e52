#!/usr/bin/env bash
# The benchmark suite (and optionally the CUDA tests) in ONE device call: bench.py's workloads on
# this checkout and, with --baseline, on a copy of a previous version, alternating new/base per
# workload, each run its own process; the same bench.py drives both (the baseline is put first on
# PYTHONPATH). Writes under --out: suite.log (everything), suite.json (every record), suite.md
# (the table), tests.log with --tests; prints the table last.
#
#   bash benchmarks/gpu_suite.sh [--baseline DIR] [--workloads all|none|w1,w2] [--quick] [--tests]
#        [--structured regex|json] [--tp N] [--wheels DIR] [--out DIR] [-- bench.py flags...]
#
# Baseline copy, made here before the call (a folder named in .git/info/exclude, carried):
#   mkdir -p .base && git archive 4817b4b | tar -x -C .base && echo 4817b4b > .base/COMMIT
# Device call: carry [".base", ".whl"] (.whl: the flash-attn wheel, plus e.g. xgrammar's), then
#   bash benchmarks/gpu_suite.sh --baseline .base --wheels .whl
#
# Time on one H100 (2026-12-06, a fresh machine, --baseline 4817b4b): every workload but
# pressure's baseline took 473 s with setup (reference ~35 s a package with its probes,
# shared-prefix ~35-40, chat ~30, sampling-n ~30, prefill ~28, long ~28, pressure ~70), so
# those seven with a baseline need ~9.5 min: split them over two calls (--workloads); top-k-top-p
# (added since) is the reference's size, ~35 s a package.
# --quick runs every workload at a quarter of its requests; --tests adds ~5 min.
set -u -o pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
baseline="" workloads=all tests=0 tp=1 out="${OUT:-gpu-logs}" wheels="" quick=0 structured="" extra=()
[ -d .whl ] && wheels=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) baseline=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --tests) tests=1; shift ;;
    --tp) tp=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --structured) structured=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_suite.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
if [ -n "$baseline" ] && [ ! -f "$baseline/nanovllm/__init__.py" ]; then
  echo "gpu_suite.sh: --baseline $baseline holds no nanovllm/ package" >&2; exit 2
fi
new=$PWD
[ -n "$baseline" ] && baseline=$(cd "$baseline" && pwd)
mkdir -p "$out"; out=$(cd "$out" && pwd)
exec > >(tee -a "$out/suite.log") 2>&1
# NVLink multicast off (tensor-parallel workers inherit it); Python unbuffered so logs interleave truly
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
start=$SECONDS
stamp() { echo "== $(( SECONDS - start ))s: $*"; }

if [ -n "$wheels" ]; then
  stamp "installing $wheels/*.whl"
  python3 -m pip install -q --no-deps "$wheels"/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=$new python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)
try:
    import flash_attn; print('flash_attn', flash_attn.__version__)
except ImportError as e: print('flash_attn missing:', e)"
if [[ " ${extra[*]} " != *" --model "* ]]; then
  stamp "the random-weight Qwen3-0.6B checkpoint (made once)"
  # NOTE: made by this checkout and passed to both runs: an older package may lack the cache helpers
  model=$(PYTHONPATH=$new timeout 300 python3 -c "import bench; print(bench.default_model_dir())" | tail -1)
  echo "$model"; extra+=(--model "$model")
fi

runs=$(mktemp -d)
report() { python3 benchmarks/suite_report.py "$runs" --out "$out" > /dev/null; }
# bench LABEL PACKAGE WORKLOAD [flags]: one bench.py process; its record lands in $runs
bench() {
  local label=$1 package=$2 workload=$3; shift 3
  local scale=(); [ "$quick" = 1 ] && scale=(--scale 0.25)
  stamp "$workload: $label ($package)"
  PYTHONPATH=$package timeout 300 python3 bench.py --workload "$workload" --tp "$tp" "${scale[@]}" \
    --json "$runs/$workload.$label.json" "$@" "${extra[@]}"
  report  # after every run, so a call cut short still brings back what finished
}
if [ "$workloads" != none ]; then
  [ "$workloads" = all ] && workloads=$(python3 -c "import bench; print(','.join(bench.WORKLOADS))")
  for w in ${workloads//,/ }; do
    bench new "$new" "$w"
    [ -n "$baseline" ] && bench base "$baseline" "$w"
  done
  [ -n "$structured" ] && bench "structured-$structured" "$new" reference --structured "$structured"
fi

if [ "$tests" = 1 ]; then
  pytest=(python3 -m pytest -q -p no:cacheprovider)
  stamp "cuda-marked tests"
  PYTHONPATH=$new timeout 330 "${pytest[@]}" -m cuda tests > "$out/tests.log" 2>&1
  stamp "engine suites on CUDA (float32 checkpoints, graphs on; HF on the CPU is the oracle)"
  PYTHONPATH=$new timeout 240 "${pytest[@]}" tests/e2e/test_overlap.py tests/models/test_hf_agreement.py \
    tests/e2e/test_invariance.py tests/e2e/test_interruption.py >> "$out/tests.log" 2>&1
  grep -E "^FAILED|^ERROR| passed| failed" "$out/tests.log"
fi

stamp "done"
[ "$workloads" != none ] && python3 benchmarks/suite_report.py "$runs" --out "$out"
exit 0
