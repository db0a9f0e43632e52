# Sourced by the device scripts (gpu_session.sh, gpu_overlap.sh, gpu_final.sh): log folder,
# NVLink multicast off (workers inherit it), the carried wheels (.whl/: flash-attn, xxhash),
# the repo on PYTHONPATH, the GPUs named in $OUT/gpu.txt, the random Qwen3-0.6B checkpoint made once.
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, flash_attn, triton; print(torch.__version__, flash_attn.__version__, triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout 120 python3 -c "import bench; print(bench.default_model_dir())" | tail -1
PYTEST="python3 -m pytest -q -p no:cacheprovider"
