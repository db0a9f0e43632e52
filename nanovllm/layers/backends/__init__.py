"""Attention backends, registered by name and imported lazily, so that `import nanovllm`
never imports triton or flash_attn.

Every backend has `name`, `store_kv(k, v, k_cache, v_cache, meta)` and
`forward(q, k, v, k_cache, v_cache, meta, scale) -> out`; `torch` is the reference.
"""
import importlib
import importlib.util
import logging

import torch

logger = logging.getLogger("nanovllm")

_BACKENDS = {
    "torch": ("nanovllm.layers.backends.torch_ref", "TorchBackend"),
    "triton": ("nanovllm.layers.backends.triton_backend", "TritonBackend"),
    "flash": ("nanovllm.layers.backends.flash", "FlashBackend"),
}
FLASH_BLOCK_SIZE = 256  # FlashAttention's paged kernels need block sizes that are multiples of 256


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype) -> str:
    """Turn `auto` into a concrete backend and check the choice can run here."""
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif half and flash_available() and block_size % FLASH_BLOCK_SIZE == 0:
            name = "flash"
        else:
            name = "triton"
        logger.info("attention backend: %s", name)
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend {name!r} needs a CUDA device; use 'torch' on {device.type}")
    if name == "flash":
        if not flash_available():
            raise ImportError("attention_backend 'flash' needs flash-attn: pip install flash-attn")
        if not half:
            raise ValueError(f"attention_backend 'flash' needs float16 or bfloat16, got dtype {dtype}")
        if block_size % FLASH_BLOCK_SIZE:
            raise ValueError(f"attention_backend 'flash' needs kvcache_block_size to be a multiple of "
                             f"{FLASH_BLOCK_SIZE}, got {block_size}; use the 'triton' backend for other sizes")
    return name


def make_backend(name: str, block_size: int, max_model_len: int):
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(block_size=block_size, max_model_len=max_model_len)
