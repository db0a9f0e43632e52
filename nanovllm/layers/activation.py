"""SwiGLU's gate: silu(gate) * up over a fused [gate | up] projection."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [num_tokens, 2 * intermediate] -> two halves
        return F.silu(gate) * up
