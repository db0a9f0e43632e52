"""FlashAttention 2 backend: varlen prefill (paged when earlier KV is involved); decode
through our Triton split-K kernel, which reads each KV head once for its whole query
group and was faster than `flash_attn_with_kvcache` on the H200 at batch 1 and 256
(docs/benchmarks.md). Needs kvcache_block_size % 256 == 0 (checked by resolve_backend)."""
import torch

from nanovllm.utils.context import AttentionMetadata

try:
    from flash_attn import flash_attn_varlen_func
except ImportError as e:  # resolve_backend checks first; this guards direct imports
    raise ImportError("the 'flash' attention backend needs flash-attn: pip install flash-attn") from e


class FlashBackend:
    name = "flash"

    def __init__(self, block_size: int, max_model_len: int):
        from nanovllm.kernels.kv_store import store_kv
        from nanovllm.kernels.paged_decode import paged_decode_attention
        self._store_kv, self._decode = store_kv, paged_decode_attention
        self.max_model_len = max_model_len

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
        assert k_scale is None, "flash reads half-precision caches only (resolve_backend refuses fp8)"
        self._store_kv(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        if meta.is_decode and k_cache.numel():
            return self._decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale,
                                max_context_len=self.max_model_len, units=meta.decode_units,
                                shared_lens=meta.decode_shared_lens)
        if not meta.has_cached_kv or not k_cache.numel():
            # every sequence is a fresh prompt: attend to this step's k/v directly
            return flash_attn_varlen_func(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                                          meta.max_seqlen_q, softmax_scale=scale, causal=True)
        return flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                      meta.max_seqlen_q, meta.max_seqlen_k, softmax_scale=scale, causal=True,
                                      block_table=meta.block_tables)
