"""Triton kernels: KV store, paged attention, and the fused elementwise layers.

`import nanovllm` imports none of the kernel modules (so CPU-only installs never touch
Triton): the attention backends and the layers' CUDA branches import them lazily.
"""
import os

import torch


def fused_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether a layer should run its fused Triton kernel on `x` (CUDA tensors, unless
    NANOVLLM_FUSED_KERNELS=0 asks for the PyTorch path, e.g. to measure the difference)."""
    return x.is_cuda and os.environ.get("NANOVLLM_FUSED_KERNELS", "1") != "0"
