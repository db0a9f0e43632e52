"""Paged attention layer: a layer's KV cache, the store of a step's K/V rows into it, and
attention over it through a backend. The model stores first (`store`, or a fused kernel
writes the rows itself, see `half_precision_cache`), then calls `attend`."""
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

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's K/V rows into the cache (NOTE: slot -1 writes nothing)."""
        if self.k_cache.numel():
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, slot_mapping, self.k_scale, self.v_scale)

    def half_precision_cache(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k_cache, v_cache) when a fused kernel may write K/V rows into them as they are
        (a cache that exists and is not fp8, which `store` quantizes); else None."""
        return (self.k_cache, self.v_cache) if self.k_cache.numel() and self.k_scale is None else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q over the cache (its K/V stored first); into `out` when given."""
        if self.k_cache.numel() and meta.split is not None:
            # a mixed step: the decodes and the prefill chunks through their own kernels
            d = meta.num_decodes
            out = torch.empty_like(q) if out is None else out
            for rows, part in ((slice(None, d), meta.split[0]), (slice(d, None), meta.split[1])):
                self._backend_forward(q[rows], k[rows], v[rows], part, out[rows])
            return out
        return self._backend_forward(q, k, v, meta, out)

    def _backend_forward(self, q, k, v, meta: AttentionMetadata, out: torch.Tensor | None) -> torch.Tensor:
        """The backend's result, in `out` when given (backends write there when they can)."""
        result = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.k_scale,
                                      self.v_scale, out=out)
        if out is None or result.data_ptr() == out.data_ptr():
            return result
        out.copy_(result)
        return out
