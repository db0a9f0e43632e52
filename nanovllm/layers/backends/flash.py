"""FlashAttention 2 backend: varlen prefill (paged when earlier KV is involved); decode
through our Triton split-K kernel, which reads each KV head once for its whole query
group and was faster than `flash_attn_with_kvcache` on the H200 at batch 1 and 256
(docs/benchmarks.md). Needs kvcache_block_size % 256 == 0 (checked by resolve_backend)."""
import torch

from nanovllm.utils.context import AttentionMetadata

try:
    import flash_attn
    from flash_attn import flash_attn_varlen_func
except ImportError as e:  # resolve_backend checks first; this guards direct imports
    raise ImportError("the 'flash' attention backend needs flash-attn: pip install flash-attn") from e


def _compiled_varlen_forward():
    """flash-attn's compiled varlen forward, called directly: `flash_attn_varlen_func` goes
    through autograd and torch.library dispatch, ~0.1 ms of host time a call (cProfile, H100
    host; 28 calls a mixed step), and cannot write into a given output. Only the CUDA build
    of the 2.8 releases, whose argument list this file follows; others get the public function."""
    if tuple(map(int, flash_attn.__version__.split(".")[:2])) != (2, 8):
        return None
    compiled = getattr(getattr(flash_attn, "flash_attn_interface", None), "flash_attn_gpu", None)
    return compiled if getattr(compiled, "__name__", None) == "flash_attn_2_cuda" else None


_FLASH_GPU = _compiled_varlen_forward()


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     block_table=None, out=None) -> torch.Tensor:
    """Causal varlen attention (paged when block_table is given); the result, in `out` when
    flash-attn could write it there (the caller checks)."""
    if _FLASH_GPU is None or q.shape[-1] % 8:  # NOTE: the public function pads other head sizes
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale=scale, causal=True, block_table=block_table)
    out = torch.empty_like(q) if out is None else out
    # (q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table, alibi_slopes,
    #  max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, zero_tensors, is_causal,
    #  window_size_left, window_size_right, softcap, return_softmax, generator) -> (out, lse, ...)
    # NOTE: for one query row per sequence flash-attn regroups the heads and returns a new tensor
    return _FLASH_GPU.varlen_fwd(q, k, v, out, cu_seqlens_q, cu_seqlens_k, None, None, block_table, None,
                                 max_seqlen_q, max_seqlen_k, 0.0, scale, False, True, -1, -1, 0.0, False, None)[0]


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
                v_scale=None, out=None) -> torch.Tensor:
        if meta.is_decode and k_cache.numel():
            return self._decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale,
                                max_context_len=self.max_model_len, units=meta.decode_units,
                                shared_lens=meta.decode_shared_lens, out=out)
        if not meta.has_cached_kv or not k_cache.numel():
            # every sequence is a fresh prompt: attend to this step's k/v directly
            return varlen_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                                    meta.max_seqlen_q, scale, out=out)
        return varlen_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                meta.max_seqlen_k, scale, block_table=meta.block_tables, out=out)
