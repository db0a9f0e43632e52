"""benchmarks/sampler.py runs every mix, and `--kernels` names the kernels it profiles (CUDA) or
refuses a CPU device in one line."""
import pytest
import torch

from benchmarks import sampler


def test_every_mix_runs_on_cpu(capsys):
    assert sampler.main(["--device", "cpu", "--batch", "4", "--vocab", "64", "--warmup", "1", "--iters", "2"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == list(sampler.MIXES)


def test_kernels_needs_cuda(capsys):
    with pytest.raises(SystemExit) as exit_:
        sampler.parse_args(["--device", "cpu", "--kernels"])
    assert exit_.value.code == 2
    assert "--kernels profiles CUDA kernels; --device is cpu" in capsys.readouterr().err


def test_kernel_names_drop_cxx_namespaces_and_templates():
    symbol = ("void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<unsigned long, 2, "
              "at::native::templates::cuda::random_from_to_kernel<at::CUDAGeneratorImpl*>(at::TensorIteratorBase&)")
    assert sampler.kernel_name(symbol) == "distribution_elementwise_grid_stride_kernel"
    assert sampler.kernel_name("_pass_kernel") == "_pass_kernel"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_lists_the_threshold_and_draw_kernels(capsys):
    assert sampler.main(["--mixes", "top-k", "--warmup", "2", "--iters", "3", "--kernels"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "device us a call" in line)
    for kernel in ("_tile_kernel", "_bounds_kernel", "_pass_kernel", "_threshold_kernel", "_chunk_kernel"):
        assert kernel in line
