"""benchmarks/sampler.py runs every mix, and `--kernels` names the kernels it profiles (CUDA) or
refuses a CPU device in one line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_every_mix_runs_on_cpu():
    from benchmarks.sampler import MIXES
    out = run("--device", "cpu", "--batch", "4", "--vocab", "64", "--warmup", "1", "--iters", "2")
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0] for line in out.stdout.splitlines()[2:]]
    assert rows == list(MIXES)


def test_kernels_needs_cuda():
    out = run("--device", "cpu", "--kernels")
    assert out.returncode == 2
    assert "--kernels profiles CUDA kernels; --device is cpu" in out.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_lists_the_threshold_and_draw_kernels():
    out = run("--mixes", "top-k", "--warmup", "2", "--iters", "3", "--kernels")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "device us a call" in line)
    for kernel in ("_tile_kernel", "_bounds_kernel", "_pass_kernel", "_threshold_kernel", "_chunk_kernel"):
        assert kernel in line


def test_kernel_names_drop_cxx_namespaces_and_templates():
    from benchmarks.sampler import kernel_name
    symbol = ("void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<unsigned long, 2, "
              "at::native::templates::cuda::random_from_to_kernel<at::CUDAGeneratorImpl*>(at::TensorIteratorBase&)")
    assert kernel_name(symbol) == "distribution_elementwise_grid_stride_kernel"
    assert kernel_name("_pass_kernel") == "_pass_kernel"
