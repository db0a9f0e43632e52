"""SwiGLU's gate: silu(gate) * up over a fused [gate | up] projection."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import fused_kernels_enabled


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels_enabled(x):
            from nanovllm.kernels.activation import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)  # [num_tokens, 2 * intermediate] -> two halves
        return F.silu(gate) * up
