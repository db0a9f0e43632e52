"""Paged attention layer: store this step's K/V in the cache, then attend through a backend."""
import torch
from torch import nn

from nanovllm.utils.context import AttentionMetadata


class Attention(nn.Module):
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

    The KV cache pool binds `k_cache`/`v_cache` ([num_blocks, block_size, num_kv_heads,
    head_dim]) and the backend once the cache exists; until then (warmup) the caches are empty.
    An fp8 cache also binds `k_scale`/`v_scale` ([num_blocks, block_size, num_kv_heads]
    float32 dequantization scales); other caches keep them None."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.k_cache = self.v_cache = torch.tensor([])
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.k_cache.numel():
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta, self.k_scale, self.v_scale)
            if meta.split is not None:  # a mixed step: decodes and prefill chunks through their own kernels
                d = meta.num_decodes
                out = torch.empty_like(q)
                for rows, part in ((slice(None, d), meta.split[0]), (slice(d, None), meta.split[1])):
                    out[rows] = self._attend(q[rows], k[rows], v[rows], part)
                return out
        return self._attend(q, k, v, meta)

    def _attend(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.k_scale,
                                    self.v_scale)
