"""The KV cache's owner: one allocation, split into per-layer K and V views."""
import torch


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers (K and V)."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


class KVCachePool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # [K/V, layer, block, slot in block, kv head, head dim]
        self.cache = torch.empty(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                 dtype=dtype, device=device)
        self.num_blocks = num_blocks

    def bind(self, attention_layers: list, backend) -> None:
        """Hand each attention layer its K/V views and the backend that reads them."""
        for i, layer in enumerate(attention_layers):
            layer.k_cache, layer.v_cache = self.cache[0, i], self.cache[1, i]
            layer.backend = backend
