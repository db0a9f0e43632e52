"""Attention backends, registered by name and imported lazily, so that `import nanovllm`
never imports triton or flash_attn.

Every backend has `name`, `store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)` and
`forward(q, k, v, k_cache, v_cache, meta, scale, k_scale, v_scale, out=None) -> result`; `torch`
is the reference. k_scale/v_scale are the fp8 cache's per-token scales, None for other caches.
`out` is where the result may go: a backend writes there when its kernel can (saving a copy)
and returns what it wrote; `Attention` copies any other result in.
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
FP8_CAPABILITY = (8, 9)  # Triton has e4m3 (float8e4nv) from Ada / Hopper on


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype,
                    kv_cache_dtype: str = "auto") -> str:
    """Turn `auto` into a concrete backend and check the choice can run here.

    kv_cache_dtype is the Config field: "auto" (the model dtype) or "fp8", which only
    the `triton` and `torch` backends read."""
    half = dtype in (torch.float16, torch.bfloat16)
    fp8 = kv_cache_dtype == "fp8"
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif half and not fp8 and flash_available() and block_size % FLASH_BLOCK_SIZE == 0:
            name = "flash"
        else:
            name = "triton"
        logger.info("attention backend: %s", name)
    if fp8:
        _check_fp8_kv_cache(name, device)
    if name != "torch" and device.type != "cuda":
        raise ValueError(f"attention_backend {name!r} needs a CUDA device; use 'torch' on {device.type}")
    if device.type == "cuda" and not triton_available():  # the KV store and fused layers are Triton on CUDA
        raise ImportError('running on CUDA needs triton (the GPU extra): pip install -e ".[cuda]"')
    if name == "flash":
        if not flash_available():
            raise ImportError("attention_backend 'flash' needs flash-attn: pip install flash-attn")
        if not half:
            raise ValueError(f"attention_backend 'flash' needs float16 or bfloat16, got dtype {dtype}")
        if block_size % FLASH_BLOCK_SIZE:
            raise ValueError(f"attention_backend 'flash' needs kvcache_block_size to be a multiple of "
                             f"{FLASH_BLOCK_SIZE}, got {block_size}; use the 'triton' backend for other sizes")
    return name


def _check_fp8_kv_cache(name: str, device: torch.device) -> None:
    """An fp8 cache is read by the torch reference and our triton kernels, not by flash."""
    if name == "flash":
        raise ValueError("attention_backend 'flash' cannot read an fp8 KV cache (kv_cache_dtype 'fp8'); "
                         "use attention_backend 'triton' or 'auto'")
    if name == "triton" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            raise ValueError(f"kv_cache_dtype 'fp8' with attention_backend 'triton' needs a GPU of compute "
                             f"capability >= {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (Triton's e4m3 type), "
                             f"this one is {capability[0]}.{capability[1]}; use kv_cache_dtype 'auto'")


def make_backend(name: str, block_size: int, max_model_len: int):
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(block_size=block_size, max_model_len=max_model_len)
