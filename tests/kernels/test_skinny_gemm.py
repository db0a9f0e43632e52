"""The skinny GEMM kernel (decode batches of <= 8 rows) against a float32 product."""
import pytest
import torch

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (100, 72)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_float32(rows, n, k, bias):
    from nanovllm.kernels.skinny_gemm import skinny_linear
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    exact = x.float() @ w.float().T + (b.float() if bias else 0)
    out = skinny_linear(x, w, b)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    assert ((out.float() - exact).norm() / exact.norm()).item() < 1e-2
