"""The KV cache's owner: one allocation, split into per-layer K and V views.

An fp8 cache (e4m3) also owns the dequantization scales, one float32 per token and KV
head, beside the cache in the same [K/V, layer, block, slot, kv head] order.
"""
import os

import torch

from nanovllm.kernels.fp8 import FP8_DTYPE, SCALE_DTYPE, is_fp8


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for Config.kv_cache_dtype ("auto": the model's dtype)."""
    return FP8_DTYPE if name == "fp8" else model_dtype


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers (K and V, and their scales for fp8)."""
    row_bytes = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if is_fp8(dtype) else 0)
    return 2 * num_layers * block_size * num_kv_heads * row_bytes


def check_kv_cache_fits(num_blocks: int, per_block: int, device: torch.device) -> None:
    """Refuse, before allocating, a cache larger than the device's free memory (CUDA) or the
    machine's RAM (CPU, where an over-committed allocation would only fail when touched)."""
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        available, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of RAM"
    needed = num_blocks * per_block
    if needed > available:
        raise ValueError(f"the KV cache of {num_blocks} blocks needs {needed / 2**30:.1f} GiB but only "
                         f"{available / 2**30:.1f} GiB are {where}: lower num_kvcache_blocks or cpu_kvcache_bytes "
                         f"(at most {available // per_block} blocks of {per_block} bytes fit)")


class KVCachePool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # [K/V, layer, block, slot in block, kv head, head dim]
        self.cache = torch.empty(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                 dtype=dtype, device=device)
        # [K/V, layer, block, slot in block, kv head]; written with each row, so never read unset
        self.scales = torch.empty(2, num_layers, num_blocks, block_size, num_kv_heads, dtype=SCALE_DTYPE,
                                  device=device) if is_fp8(dtype) else None
        self.num_blocks = num_blocks

    def bind(self, attention_layers: list, backend) -> None:
        """Hand each attention layer its K/V views (and scales) and the backend that reads them.

        NOTE: the views are fixed for the pool's life, so CUDA graphs may capture their addresses."""
        for i, layer in enumerate(attention_layers):
            layer.k_cache, layer.v_cache = self.cache[0, i], self.cache[1, i]
            if self.scales is not None:
                layer.k_scale, layer.v_scale = self.scales[0, i], self.scales[1, i]
            layer.backend = backend
