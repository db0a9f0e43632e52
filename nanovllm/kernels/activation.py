"""Fused SwiGLU gate: silu(gate) * up in one pass over [gate | up] (PyTorch takes 3 kernels)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in `dtype`, rounded as F.silu(gate) * up rounds (shared with the skinny
    GEMM, which applies it as it reads its input: both give the same bits)."""
    gate, up = gate.to(tl.float32), up.to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # rounded like F.silu's output
    return (act * up).to(dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * width] -> [num_tokens, width]."""
    num_tokens, width = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, width, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(width))
    if num_tokens:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, block))](x, out, x.stride(0), out.stride(0), width,
                                                                       BLOCK=block, num_warps=4)
    return out
