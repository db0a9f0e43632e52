"""The pure-PyTorch paged attention reference: exact, slow, runs anywhere.

It is the oracle the Triton and FlashAttention backends are tested against, and the
backend CPU runs use. Shapes:
  q:        [num_tokens, num_heads, head_dim]
  k, v:     [num_tokens, num_kv_heads, head_dim]
  k_cache:  [num_blocks, block_size, num_kv_heads, head_dim] (v_cache alike)
  k_scale:  [num_blocks, block_size, num_kv_heads] float32, fp8 caches only (v_scale alike)

An fp8 cache is quantized on store and dequantized on read by `nanovllm.kernels.fp8`,
the rule the Triton kernels reproduce.
"""
import torch

from nanovllm.kernels.fp8 import dequantize_fp8, is_fp8, quantize_fp8
from nanovllm.utils.context import AttentionMetadata


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Scatter each token's K/V row into its cache slot; slot -1 writes nothing."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = x[valid]  # [num_valid, num_kv_heads, head_dim]
        if is_fp8(cache.dtype):
            rows, row_scale = quantize_fp8(rows)
            scale.view(-1, scale.shape[2])[slots] = row_scale
        cache.view(-1, *cache.shape[2:])[slots] = rows.to(cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q_len queries that are the last q_len of k_len keys, in float32."""
    q_len, num_heads, _ = q.shape
    k_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)  # [k_len, num_heads, head_dim]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [num_heads, q_len, k_len]
    # query j sits at absolute position k_len - q_len + j and sees keys 0..that position
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
    k_pos = torch.arange(k_len, device=q.device)
    scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def gather_dequantized(cache: torch.Tensor, cache_scale: torch.Tensor | None, block_table: torch.Tensor,
                       length: int) -> torch.Tensor:
    """`gather_kv`, dequantized to float32 when the cache is fp8."""
    rows = gather_kv(cache, block_table, length)
    if not is_fp8(cache.dtype):
        return rows
    return dequantize_fp8(rows, gather_kv(cache_scale, block_table, length))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention over the paged cache (prefill chunks and decodes alike)."""
    out = torch.zeros_like(q)
    cu_q = cu_seqlens_q.tolist()
    for i, k_len in enumerate(context_lens.tolist()):
        start, end = cu_q[i], cu_q[i + 1]
        if k_len == 0 or end == start:  # CUDA-graph padding row
            continue
        k = gather_dequantized(k_cache, k_scale, block_tables[i], k_len)
        v = gather_dequantized(v_cache, v_scale, block_tables[i], k_len)
        out[start:end] = attend(q[start:end], k, v, scale)
    return out


class TorchBackend:
    """Reference backend: any block size, any device, no CUDA graphs needed."""

    name = "torch"

    def __init__(self, block_size: int = 16, max_model_len: int = 0):
        pass  # the reference needs no sizes fixed ahead

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None, out=None) -> torch.Tensor:  # NOTE: a new tensor always (the layer copies)
        if k_cache.numel() == 0:  # warmup before the cache exists: plain causal prefill
            return self._forward_uncached(q, k, v, meta, scale)
        return paged_attention_ref(q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens,
                                   meta.block_tables, scale, k_scale, v_scale)

    @staticmethod
    def _forward_uncached(q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        cu = meta.cu_seqlens_q.tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            out[start:end] = attend(q[start:end], k[start:end], v[start:end], scale)
        return out
