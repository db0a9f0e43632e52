"""Attention backend on our own Triton kernels (`nanovllm/kernels`).

Same interface as `TorchBackend`; the only module that imports the kernels, so that
`import nanovllm` never imports Triton. Decode steps use the split-K decode kernel,
every other step the varlen paged prefill kernel. CUDA-graph safe: no host syncs, and
the decode split count depends only on the batch shape and max_model_len.
"""
import torch

from nanovllm.kernels.kv_store import store_kv
from nanovllm.kernels.paged_decode import paged_decode_attention
from nanovllm.kernels.paged_prefill import paged_prefill_attention
from nanovllm.utils.context import AttentionMetadata


class TritonBackend:
    """Paged attention on Triton kernels: any power-of-two block size >= 16."""

    name = "triton"

    def __init__(self, block_size: int | None = None, max_model_len: int | None = None,
                 num_decode_splits: int | None = None):
        # The kernels take the block size from the cache's shape; block_size is accepted
        # for the common backend constructor. max_model_len bounds one sequence's keys, so it
        # caps the decode splits (default: the block table's width). num_decode_splits fixes
        # the count instead. Either way the count is a Python int: CUDA-graph safe.
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.num_decode_splits = num_decode_splits

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        if k_cache.numel() == 0:  # warmup before the cache exists: nothing to write to
            return
        store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim] (decode: in `out`)."""
        if k_cache.numel() == 0:  # warmup before the cache exists: plain causal prefill
            return self._forward_uncached(q, k, v, meta, scale)
        if meta.is_decode:
            return paged_decode_attention(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale,
                                          num_splits=self.num_decode_splits, max_context_len=self.max_model_len,
                                          k_scale=k_scale, v_scale=v_scale, units=meta.decode_units,
                                          shared_lens=meta.decode_shared_lens, out=out)
        return paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens,
                                       meta.block_tables, meta.max_seqlen_q, scale, k_scale, v_scale)

    @staticmethod
    def _forward_uncached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
        """Causal attention of each sequence over its own new k/v (q_len == k_len).

        Runs the paged prefill kernel with k/v seen as a cache of one-token pages
        ([num_tokens, 1, num_kv_heads, head_dim]) and page id = token row, so no host sync.
        """
        cu_seqlens = meta.cu_seqlens_q  # [num_seqs + 1] int32
        seq_lens = cu_seqlens[1:] - cu_seqlens[:-1]  # [num_seqs]
        offsets = torch.arange(meta.max_seqlen_q, dtype=cu_seqlens.dtype, device=q.device)
        # NOTE: entries past a sequence's length point at other rows but are never read
        block_tables = (cu_seqlens[:-1, None] + offsets[None, :]).to(torch.int32)  # [num_seqs, max_seqlen_q]
        return paged_prefill_attention(q, k.unsqueeze(1), v.unsqueeze(1), cu_seqlens, seq_lens.to(torch.int32),
                                       block_tables, meta.max_seqlen_q, scale)
