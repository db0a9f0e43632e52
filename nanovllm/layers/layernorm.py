"""RMSNorm, optionally fused with the residual add that precedes it."""
import torch
from torch import nn

from nanovllm.kernels import fused_kernels_enabled


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 whatever the activation dtype, as HF does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual).
        On CUDA one fused kernel does it all (updating `residual` in place)."""
        if fused_kernels_enabled(x):
            from nanovllm.kernels.rmsnorm import rmsnorm
            return rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
