"""The fused elementwise kernels (RMSNorm, q/k-norm + RoPE, SiLU-and-mul) against the
PyTorch layer paths they replace. On CPU they run under Triton's interpreter (the root
conftest sets TRITON_INTERPRET=1); on a GPU the `cuda` variants run them for real."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

from nanovllm.kernels.activation import silu_and_mul
from nanovllm.kernels.kv_store import store_kv
from nanovllm.kernels.rmsnorm import rmsnorm
from nanovllm.kernels.rotary import qk_norm_rope
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# NOTE: Triton's CPU interpreter rounds float32 -> bfloat16 differently from the GPU (it is
# off by one ulp a third of the time), so bf16 is checked on CUDA only
CASES = [("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
         pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)]
# fp32: only summation order differs; bf16: that can flip one rounding step (1 ulp ~ 2^-8 relative)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def torch_rmsnorm(x, weight, eps, residual=None):
    norm = RMSNorm(x.shape[-1], eps).to(x.device, x.dtype)
    norm.weight.data.copy_(weight)
    return norm._norm(x) if residual is None else norm._norm(x + residual)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_torch(device, dtype, with_residual):
    torch.manual_seed(0)
    x = torch.randn(7, 96, device=device, dtype=dtype) * 3
    weight = torch.randn(96, device=device, dtype=dtype)
    residual = torch.randn(7, 96, device=device, dtype=dtype) if with_residual else None
    expected = torch_rmsnorm(x, weight, 1e-6, residual)
    expected_residual = (x + residual) if with_residual else None
    out = rmsnorm(x, weight, 1e-6, residual.clone() if with_residual else None)
    if with_residual:
        out, new_residual = out
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)  # exactly x + r, rounded
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rmsnorm_on_strided_heads(device):
    # per-head norm of a q view inside a fused qkv row: token stride != heads * head_dim
    torch.manual_seed(1)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, device=device)
    q = qkv[:, :64].view(5, 4, 16)
    weight = torch.randn(16, device=device)
    torch.testing.assert_close(rmsnorm(q, weight, 1e-6), torch_rmsnorm(q, weight, 1e-6), **TOL[torch.float32])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("num_tokens", [6, 150])  # a token per program; tiles of 16, the last one ragged
def test_qk_norm_rope_matches_torch(device, dtype, qk_norm, num_tokens):
    torch.manual_seed(2)
    heads, kv_heads, head_dim = 4, 2, 32
    rope = RotaryEmbedding(head_dim, 512, 10000.0).to(device)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype) * 2
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 512, (num_tokens,), device=device)
    q_w = torch.randn(head_dim, device=device, dtype=dtype) if qk_norm else None
    k_w = torch.randn(head_dim, device=device, dtype=dtype) if qk_norm else None
    eq, ek = (torch_rmsnorm(q, q_w, 1e-6), torch_rmsnorm(k, k_w, 1e-6)) if qk_norm else (q, k)
    eq, ek = rope(positions, eq, ek)
    oq, ok = qk_norm_rope(q, k, positions, rope.cos, rope.sin, q_w, k_w, 1e-6)
    torch.testing.assert_close(oq, eq, **TOL[dtype])
    torch.testing.assert_close(ok, ek, **TOL[dtype])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [6, 150])
def test_qk_norm_rope_stores_what_store_kv_stores(device, dtype, num_tokens):
    # the fused store writes the returned (rotated) k and the given v where store_kv would,
    # bit for bit, and nothing for slot -1
    torch.manual_seed(4)
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 4
    rope = RotaryEmbedding(head_dim, 512, 10000.0).to(device)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in (q, k, v))
    positions = torch.randint(0, 512, (num_tokens,), device=device)
    slots = torch.randperm(num_tokens + 4, device=device)[:num_tokens]
    slots[2] = -1
    w = torch.randn(head_dim, device=device, dtype=dtype)
    caches = [torch.randn(num_tokens // block_size + 2, block_size, kv_heads, head_dim, device=device, dtype=dtype)
              for _ in range(2)]
    expected = [c.clone() for c in caches]
    oq, ok = qk_norm_rope(q, k, positions, rope.cos, rope.sin, w, w, 1e-6, store=(v, *caches, slots))
    store_kv(ok, v, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    eq, ek = qk_norm_rope(q, k, positions, rope.cos, rope.sin, w, w, 1e-6)
    assert torch.equal(oq, eq) and torch.equal(ok, ek)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("width", [48, 1500])  # one block; several column blocks with a ragged end
def test_silu_and_mul_matches_torch(device, dtype, width):
    torch.manual_seed(3)
    x = torch.randn(5, 2 * width, device=device, dtype=dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, **TOL[dtype])


def test_kernels_accept_empty_batches():
    x = torch.empty(0, 32)
    assert rmsnorm(x, torch.ones(32), 1e-6).shape == (0, 32)
    assert silu_and_mul(torch.empty(0, 64)).shape == (0, 32)


@pytest.mark.parametrize("variant", ["qwen3", "llama"])
def test_engine_with_fused_kernels_matches_hf(checkpoint, variant, monkeypatch):
    """The layers' CUDA branches (in-place residual, fused q/k norm + RoPE), forced on for
    CPU tensors: prefill logits must still match HF."""
    import nanovllm.layers.activation
    import nanovllm.layers.layernorm
    import nanovllm.models.qwen3
    from nanovllm import LLM
    from tests.conftest import VOCAB
    from tests.helpers import hf_logits, random_prompts
    from tests.models.test_hf_agreement import engine_logits

    for module in (nanovllm.layers.activation, nanovllm.layers.layernorm, nanovllm.models.qwen3):
        monkeypatch.setattr(module, "fused_kernels_enabled", lambda x: True)
    path = checkpoint(variant)
    llm = LLM(path, kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=32)
    prompt = random_prompts([40], VOCAB, seed=9)[0]
    expected = hf_logits(path, prompt)
    diff = (engine_logits(llm, prompt) - expected).abs().max().item()
    # float32 throughout; the kernels sum in another order and use exp-based SiLU, which the
    # large random weights (init 0.5) amplify to ~1e-5 of the logit scale
    assert diff <= 1e-5 * expected.abs().max().item(), f"max abs logit diff {diff}"
