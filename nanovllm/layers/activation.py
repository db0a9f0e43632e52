"""SwiGLU's gate: silu(gate) * up over a fused [gate | up] projection."""
import torch
import torch.nn.functional as F

from nanovllm.kernels import fused_kernels_enabled


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * intermediate] = [gate | up] -> silu(gate) * up; one kernel on CUDA."""
    if fused_kernels_enabled(x):
        from nanovllm.kernels.activation import silu_and_mul as fused
        return fused(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
