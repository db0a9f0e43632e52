"""The skinny GEMM kernel (one-row decode projections; any row count stays correct) against a
float32 product. On CPU it runs under Triton's interpreter (the root conftest sets
TRITON_INTERPRET=1) at small tiles; the `cuda` cases run the model's shapes and every split."""
import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

from nanovllm.kernels.activation import silu_and_mul
from nanovllm.kernels.skinny_gemm import SkinnyConfig, default_config, skinny_config, skinny_linear

# K = 72 and 200 leave a ragged last chunk (no EVEN_K); 200 in 32-column chunks is 7 chunks,
# so split 4 gets 2 + 2 + 2 + 1 chunks and split 8 leaves a split empty (it must add zeros)
CPU_CASES = [(1, 100, 72), (3, 37, 200), (1, 64, 256)]
CPU_SPLITS = [1, 2, 4, 8]


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.float() - exact).norm() / exact.norm()).item()


def make_inputs(rows, n, k, bias, device, dtype):
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * 0.05
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    exact = x.float() @ w.float().T + (b.float() if bias else 0)
    return x, w, b, exact


@pytest.mark.parametrize("rows,n,k", CPU_CASES)
@pytest.mark.parametrize("split_k", CPU_SPLITS)
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_interpreted(rows, n, k, split_k, bias):
    torch.manual_seed(0)
    x, w, b, exact = make_inputs(rows, n, k, bias, "cpu", torch.float32)
    out = skinny_linear(x, w, b, SkinnyConfig(block_n=8, block_k=32, num_warps=4, num_stages=1, split_k=split_k))
    assert out.shape == (rows, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)  # fp32: only the summation order differs


@pytest.mark.parametrize("rows,n,k", CPU_CASES)
@pytest.mark.parametrize("split_k", [1, 4])
def test_gated_skinny_linear_is_silu_and_mul_then_the_product(rows, n, k, split_k):
    """The SwiGLU gate applied while reading x gives the same bits as its own kernel first."""
    torch.manual_seed(1)
    x = torch.randn(rows, 2 * k) * 3
    w = torch.randn(n, k) * 0.05
    cfg = SkinnyConfig(block_n=8, block_k=32, num_warps=4, num_stages=1, split_k=split_k)
    gated = skinny_linear(x, w, config=cfg, gated=True)
    assert gated.shape == (rows, n)
    assert torch.equal(gated, skinny_linear(silu_and_mul(x), w, config=cfg))


def test_skinny_linear_zero_rows():
    w = torch.randn(16, 32)
    assert skinny_linear(torch.empty(0, 32), w).shape == (0, 16)


def test_unknown_shape_gets_the_default_config():
    assert skinny_config(12345, 678) == default_config(12345, 678)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (100, 72), (1000, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_float32(rows, n, k, bias):
    x, w, b, exact = make_inputs(rows, n, k, bias, "cuda", torch.bfloat16)
    out = skinny_linear(x, w, b)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    assert rel_err(out, exact) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n,k", [(1024, 3072), (100, 72), (1000, 1000), (37, 1500)])
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("block_n,block_k,num_warps,num_stages", [(4, 512, 4, 1), (16, 256, 8, 3), (8, 128, 2, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_every_split_path(rows, n, k, split_k, block_n, block_k, num_warps, num_stages, bias):
    cfg = SkinnyConfig(block_n, block_k, num_warps, num_stages, split_k)
    x, w, b, exact = make_inputs(rows, n, k, bias, "cuda", torch.bfloat16)
    out = skinny_linear(x, w, b, cfg)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    assert rel_err(out, exact) < 1e-2


@pytest.mark.cuda
def test_split_k_is_deterministic_and_graph_capturable():
    x, w, b, _ = make_inputs(1, 1024, 3072, True, "cuda", torch.bfloat16)
    cfg = SkinnyConfig(8, 256, 4, 3, split_k=4)
    eager = skinny_linear(x, w, b, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = skinny_linear(x, w, b, cfg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)  # same split order every run: bit-identical sums


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(1024, 3072), (1000, 1000)])
def test_gated_skinny_linear_cuda_bf16(n, k):
    x = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16) * 3
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    assert torch.equal(skinny_linear(x, w, gated=True), skinny_linear(silu_and_mul(x), w))
