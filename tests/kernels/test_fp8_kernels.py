"""The Triton kernels on an fp8 (e4m3) KV cache against the torch reference on the same cache.

The KV store must quantize bit for bit like `quantize_fp8`; prefill and decode read the
same e4m3 values and scales as the reference, so they agree to float32 rounding (the
quantization error itself is the same on both sides). CPU cases run in Triton's
interpreter at small shapes; the `cuda` cases repeat them at Qwen3-0.6B shapes in bf16.
"""
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

from nanovllm.kernels.fp8 import FP8_DTYPE, SCALE_DTYPE, quantize_fp8
from nanovllm.kernels.kv_store import store_kv
from nanovllm.kernels.paged_decode import paged_decode_attention
from nanovllm.kernels.paged_prefill import paged_prefill_attention
from nanovllm.layers.backends.torch_ref import TorchBackend, paged_attention_ref, store_kv_ref
from nanovllm.layers.backends.triton_backend import TritonBackend
from tests.kernels.test_triton_kernels import MIXED, QWEN3, TOL, PagedBatch, assert_close, cu_seqlens, make_step

CPU = torch.device("cpu")
GPU = torch.device("cuda")
SENTINEL_BITS = 0x55  # poisons fp8 cache bytes that must stay untouched (1.3125 * 2^3)
SENTINEL_SCALE = 1234.5
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def fresh_seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def token_magnitudes(shape: tuple, device: torch.device, spread: float = 1.0) -> torch.Tensor:
    """Per-(token, head) magnitudes exp(spread * N(0, 1)), broadcastable over head_dim: scales
    that differ by row, so a kernel ignoring or misaddressing them cannot pass. (Attention
    keeps spread 1: wider spreads make softmax one-hot and float32 rounding visible.)"""
    return torch.exp(spread * torch.randn(*shape, 1, device=device))


class Fp8PagedBatch(PagedBatch):
    """PagedBatch whose caches hold e4m3 values with per-(slot, head) float32 scales."""

    def __init__(self, k_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device):
        super().__init__(k_lens, block_size, num_kv_heads, head_dim, torch.float32, device)
        magnitude = token_magnitudes(self.k_cache.shape[:3], device)
        self.k_cache, self.k_scale = quantize_fp8(self.k_cache * magnitude)
        self.v_cache, self.v_scale = quantize_fp8(self.v_cache * magnitude.flip(0))


# ----------------------------------------------------------------------------- store_kv
def check_fp8_store_kv(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> None:
    num_heads = 2 * num_kv_heads
    num_blocks = -(-2 * num_tokens // block_size) + 1
    # k, v are strided views of a fused qkv projection, with magnitudes varying by token and head
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device)
    qkv = (qkv * token_magnitudes(qkv.shape[:2], device, spread=3.0)).to(dtype)  # ~6 decades
    _, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    assert not k.is_contiguous()
    k[1] = 0.0  # an all-zero row: scale stays finite, values exact zeros
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    padding = torch.rand(num_tokens, device=device) < 0.25  # CUDA-graph padding rows
    padding[0], padding[1] = True, False
    slots[padding] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, SENTINEL_BITS, dtype=torch.uint8, device=device).view(FP8_DTYPE)
    v_cache = k_cache.clone()
    k_scale = torch.full(shape[:3], SENTINEL_SCALE, dtype=SCALE_DTYPE, device=device)
    v_scale = k_scale.clone()
    ref = [x.clone() for x in (k_cache, v_cache, k_scale, v_scale)]

    store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    store_kv_ref(k, v, ref[0], ref[1], slots, ref[2], ref[3])
    # the same bits as quantize_fp8, not merely close values
    assert torch.equal(k_cache.view(torch.uint8), ref[0].view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref[1].view(torch.uint8))
    assert torch.equal(k_scale, ref[2]) and torch.equal(v_scale, ref[3])
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    assert written.sum() == (slots >= 0).sum()
    for cache in (k_cache, v_cache):  # NOTE: slot -1 and unused slots keep their bytes
        assert (cache.view(torch.uint8).view(-1, num_kv_heads * head_dim)[~written] == SENTINEL_BITS).all()
    for scale in (k_scale, v_scale):
        assert (scale.view(-1, num_kv_heads)[~written] == SENTINEL_SCALE).all()
        assert (scale.view(-1, num_kv_heads)[written] > 0).all()
    zero_row = slots[1]
    assert (k_cache.view(-1, num_kv_heads, head_dim)[zero_row].float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 32), (32, 3, 24)])
def test_fp8_store_kv_matches_reference_bits(block_size, num_kv_heads, head_dim, dtype):
    check_fp8_store_kv(24, num_kv_heads, head_dim, block_size, dtype, CPU)


def test_fp8_store_kv_rounds_ties_to_even():
    # rows whose values sit exactly halfway between e4m3 neighbours (448 = amax, so scale 1):
    # 1.0625 -> 1.0, 1.1875 -> 1.25, 1.9375 -> 2.0 (the mantissa carries into the exponent)
    row = torch.tensor([448.0, 1.0625, 1.1875, 1.9375, -1.9375, 2 ** -10, 3 * 2 ** -10, 0.0])
    k = row.repeat(1, 1, 2)[:, :, :16]  # [1 token, 1 head, 16]
    k_cache = torch.zeros(1, 16, 1, 16, dtype=FP8_DTYPE)
    k_scale = torch.zeros(1, 16, 1)
    store_kv(k, k, k_cache, k_cache.clone(), torch.tensor([3]), k_scale, k_scale.clone())
    expected = torch.tensor([448.0, 1.0, 1.25, 2.0, -2.0, 0.0, 2 ** -8, 0.0])
    assert torch.equal(k_cache[0, 3, 0, :8].float(), expected) and k_scale[0, 3, 0] == 1.0
    assert torch.equal(k_cache[0, 3, 0, :8].view(torch.uint8), quantize_fp8(row)[0].view(torch.uint8))


# ----------------------------------------------------------------------------- prefill / decode
def assert_attention_close(out, ref, q, k_cache, v_cache, cu_q, context_lens, block_tables, scale, k_scale,
                           v_scale) -> None:
    """`assert_close`, but a bf16 output may also be off by 2^-7 of sum(p * |v|): the kernels
    multiply P and V in bf16, each weighted term rounded to ~2^-9 of itself, so where terms
    cancel the error is bounded by their magnitudes, not by the small output (measured on an
    H100: 1 to 30 of millions of outputs exceed a plain 0.02 tolerance, all at cancellations)."""
    if out.dtype == torch.float32:
        assert_close(out, ref, out.dtype)
        return
    v_abs = v_cache.float().abs().to(v_cache.dtype)  # exact: |e4m3| is an e4m3 value
    bound = paged_attention_ref(q.float(), k_cache, v_abs, cu_q, context_lens, block_tables, scale, k_scale, v_scale)
    err = (out.float() - ref.float()).abs()
    assert out.shape == ref.shape and not out.isnan().any()
    slack = err - TOL[out.dtype] * (1 + ref.float().abs()) - 2 ** -7 * bound
    assert (slack <= 0).all(), f"worst excess {slack.max().item():.3e}"


def check_fp8_prefill(q_lens: list[int], k_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    batch = Fp8PagedBatch(k_lens, block_size, num_kv_heads, head_dim, device)
    cu_q = cu_seqlens(q_lens, device)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim ** -0.5
    args = (batch.k_cache, batch.v_cache, cu_q, batch.context_lens, batch.block_tables)
    out = paged_prefill_attention(q, *args, max(q_lens), scale, batch.k_scale, batch.v_scale)
    ref = paged_attention_ref(q, *args, scale, batch.k_scale, batch.v_scale)
    assert_attention_close(out, ref, q, batch.k_cache, batch.v_cache, *args[2:], scale, batch.k_scale, batch.v_scale)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 2), (2, 2)])  # GQA, group of 3, MHA
@pytest.mark.parametrize("block_size", [16, 32])
def test_fp8_prefill_matches_reference(block_size, num_heads, num_kv_heads):
    q_lens, k_lens = map(list, zip(*MIXED))
    check_fp8_prefill(q_lens, k_lens, num_heads, num_kv_heads, 32, block_size, torch.float32, CPU)


def test_fp8_prefill_bf16_queries():
    q_lens, k_lens = map(list, zip(*MIXED))
    check_fp8_prefill(q_lens, k_lens, 4, 2, 32, 16, torch.bfloat16, CPU)


def check_fp8_decode(k_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                     dtype: torch.dtype, device: torch.device, num_splits: int | None) -> None:
    batch = Fp8PagedBatch(k_lens, block_size, num_kv_heads, head_dim, device)
    q = torch.randn(len(k_lens), num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.context_lens, batch.block_tables, scale,
                                 num_splits=num_splits, k_scale=batch.k_scale, v_scale=batch.v_scale)
    cu_q = torch.arange(len(k_lens) + 1, dtype=torch.int32, device=device)
    ref = paged_attention_ref(q, batch.k_cache, batch.v_cache, cu_q, batch.context_lens, batch.block_tables, scale,
                              batch.k_scale, batch.v_scale)
    assert_attention_close(out, ref, q, batch.k_cache, batch.v_cache, cu_q, batch.context_lens, batch.block_tables,
                           scale, batch.k_scale, batch.v_scale)
    assert (out[batch.context_lens == 0] == 0).all()  # CUDA-graph padding rows: exact zeros


@pytest.mark.parametrize("block_size,num_splits,num_heads,num_kv_heads,dtype", [
    (16, 1, 8, 2, torch.float32), (16, 3, 4, 4, torch.float32), (32, 8, 8, 2, torch.float32),
    (16, None, 6, 2, torch.float32), (16, 3, 8, 2, torch.bfloat16),
])
def test_fp8_decode_matches_reference(block_size, num_splits, num_heads, num_kv_heads, dtype):
    # 0: a padding row; 1 and 7: shorter than one tile; 100: more splits than 32-key tiles
    check_fp8_decode([70, 0, 1, 100, 7, 33], num_heads, num_kv_heads, 32, block_size, dtype, CPU, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_units_read_shared_keys_once(num_splits):
    # rows 0-2 hold row 0's first two blocks (as n samples of one prompt): their unit reads
    # those 32 keys, and their per-key scales, once
    batch = Fp8PagedBatch([50, 40, 70, 33], 16, 2, 32, CPU)
    batch.block_tables[1:3, :2] = batch.block_tables[0, :2]
    units = torch.tensor([[0, 1, 2, -1], [3, -1, -1, -1], [-1] * 4, [-1] * 4], dtype=torch.int32)
    shared = torch.tensor([32, 0, 0, 0], dtype=torch.int32)
    q = torch.randn(4, 8, 32)
    args = (q, batch.k_cache, batch.v_cache, batch.context_lens, batch.block_tables, 0.2)
    scales = dict(k_scale=batch.k_scale, v_scale=batch.v_scale)
    out = paged_decode_attention(*args, num_splits=num_splits, units=units, shared_lens=shared, **scales)
    cu_q = torch.arange(5, dtype=torch.int32)
    ref = paged_attention_ref(*args[:3], cu_q, *args[3:], batch.k_scale, batch.v_scale)
    assert_attention_close(out, ref, q, batch.k_cache, batch.v_cache, cu_q, batch.context_lens, batch.block_tables,
                           0.2, batch.k_scale, batch.v_scale)


# ----------------------------------------------------------------------------- backend
def check_fp8_backend(q_lens: list[int], k_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype, device: torch.device, pad_seqs: int = 0) -> None:
    """One step through both backends: store this step's K/V into the fp8 cache, then attend."""
    batch = Fp8PagedBatch(k_lens, block_size, num_kv_heads, head_dim, device)
    meta = make_step(q_lens, k_lens, batch, pad_seqs)
    num_tokens = meta.slot_mapping.shape[0]
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device)
    qkv = (qkv * token_magnitudes(qkv.shape[:2], device)).to(dtype)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    scale = head_dim ** -0.5
    results = {}
    for backend in (TorchBackend(), TritonBackend(block_size=block_size, max_model_len=max(k_lens))):
        cache = [x.clone() for x in (batch.k_cache, batch.v_cache, batch.k_scale, batch.v_scale)]
        backend.store_kv(k, v, cache[0], cache[1], meta.slot_mapping, cache[2], cache[3])
        out = backend.forward(q, k, v, cache[0], cache[1], meta, scale, cache[2], cache[3])
        results[backend.name] = cache, out
    (ref_cache, ref_out), (cache, out) = results["torch"], results["triton"]
    for got, want in zip(cache, ref_cache):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert_attention_close(out, ref_out, q, ref_cache[0], ref_cache[1], meta.cu_seqlens_q, meta.context_lens,
                           meta.block_tables, scale, ref_cache[2], ref_cache[3])
    if pad_seqs:
        assert (out[-pad_seqs:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_backend_prefill_step(dtype):
    q_lens, k_lens = map(list, zip(*MIXED))
    check_fp8_backend(q_lens, k_lens, 4, 2, 32, 16, dtype, CPU)


def test_fp8_backend_decode_step_with_padding():
    check_fp8_backend([1, 1, 1], [50, 1, 130], 4, 2, 32, 32, torch.float32, CPU, pad_seqs=2)


def test_fp8_reference_attends_to_dequantized_values():
    """The oracle itself: fp8 attention equals float32 attention over the dequantized cache."""
    batch = Fp8PagedBatch([40, 9], 16, 2, 16, CPU)
    q = torch.randn(2, 4, 16)
    cu_q = torch.arange(3, dtype=torch.int32)
    out = paged_attention_ref(q, batch.k_cache, batch.v_cache, cu_q, batch.context_lens, batch.block_tables, 0.25,
                              batch.k_scale, batch.v_scale)
    k = batch.k_cache.float() * batch.k_scale[..., None]
    v = batch.v_cache.float() * batch.v_scale[..., None]
    expected = paged_attention_ref(q, k, v, cu_q, batch.context_lens, batch.block_tables, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- CUDA, Qwen3-0.6B shapes
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=cuda_only)])
def test_cuda_fp8_store_kv(block_size, mark):
    check_fp8_store_kv(4096, QWEN3["num_kv_heads"], QWEN3["head_dim"], block_size, torch.bfloat16, GPU)


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=cuda_only)])
def test_cuda_fp8_prefill(block_size, mark):
    q_lens = [1024, 300, 512, 777, 1, 1, 64, 2048]
    k_lens = [1024, 2048, 1500, 777, 2000, 1, 1100, 2048]
    check_fp8_prefill(q_lens, k_lens, **QWEN3, block_size=block_size, dtype=torch.bfloat16, device=GPU)


@pytest.mark.parametrize("block_size,num_splits", [(16, None), (256, None), (256, 1), (16, 32)])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=cuda_only)])
def test_cuda_fp8_decode(block_size, num_splits, mark):
    k_lens = torch.randint(1, 2049, (64,)).tolist()
    k_lens[5] = k_lens[40] = 0
    check_fp8_decode(k_lens, **QWEN3, block_size=block_size, dtype=torch.bfloat16, device=GPU,
                     num_splits=num_splits)


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=cuda_only)])
def test_cuda_fp8_backend(block_size, mark):
    k_lens = torch.randint(1, 2049, (64,)).tolist()
    check_fp8_backend([1] * 64, k_lens, **QWEN3, block_size=block_size, dtype=torch.bfloat16, device=GPU,
                      pad_seqs=8)
    check_fp8_backend([1024, 100, 1, 1], [1024, 1500, 900, 2], **QWEN3, block_size=block_size,
                      dtype=torch.bfloat16, device=GPU)


@pytest.mark.parametrize("mark", [pytest.param(None, marks=cuda_only)])
def test_cuda_fp8_graph_decode(mark):
    """Captured once, replayed with new contents: the fp8 store + decode follow the tensors,
    and the scale buffers are read at their captured addresses."""
    num_seqs, block_size = 32, 16
    batch = Fp8PagedBatch([2048] * num_seqs, block_size, QWEN3["num_kv_heads"], QWEN3["head_dim"], GPU)
    caches = (batch.k_cache, batch.v_cache, batch.k_scale, batch.v_scale)
    q = torch.randn(num_seqs, QWEN3["num_heads"], QWEN3["head_dim"], dtype=torch.bfloat16, device=GPU)
    k = torch.randn(num_seqs, QWEN3["num_kv_heads"], QWEN3["head_dim"], dtype=torch.bfloat16, device=GPU)
    v = torch.randn_like(k)
    slots = torch.full((num_seqs,), -1, dtype=torch.long, device=GPU)
    context_lens = batch.context_lens.clone()

    def step():
        store_kv(k, v, caches[0], caches[1], slots, caches[2], caches[3])
        return paged_decode_attention(q, caches[0], caches[1], context_lens, batch.block_tables, 0.1,
                                      max_context_len=2048, k_scale=caches[2], v_scale=caches[3])

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        lens = torch.randint(1, 2049, (num_seqs,), device=GPU).to(torch.int32)
        lens[-4:] = 0  # padding rows
        context_lens.copy_(lens)
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k) * 10)
        v.copy_(torch.randn_like(v) * 0.1)
        pos = (lens - 1).clamp(min=0).long()
        new_slots = batch.block_tables[torch.arange(num_seqs, device=GPU), pos // block_size].long() * block_size
        slots.copy_(torch.where(lens > 0, new_slots + pos % block_size, -1))
        ref = [x.clone() for x in caches]
        store_kv_ref(k, v, ref[0], ref[1], slots, ref[2], ref[3])
        graph.replay()
        for got, want in zip(caches, ref):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=GPU)
        expected = paged_attention_ref(q, ref[0], ref[1], cu_q, context_lens, batch.block_tables, 0.1, ref[2], ref[3])
        assert_attention_close(out, expected, q, ref[0], ref[1], cu_q, context_lens, batch.block_tables, 0.1, ref[2],
                               ref[3])
        assert (out[-4:] == 0).all()
