"""Fused RMSNorm kernels: optional residual add + normalize + scale, one pass per row.

The unfused PyTorch version launches ~8 elementwise kernels per norm; a decode step has
4 norms per layer (input, post-attention, q, k), so fusing them removes most of a
decode step's small launches. Rounding follows the PyTorch path exactly: the residual
sum is rounded to the activation dtype, statistics are float32, the normalized value is
rounded before the weight multiply.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                    num_heads, stride_xt, stride_xh, stride_rt, stride_ot, stride_oh, eps,
                    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)               # one (token, head) row of `HIDDEN` values
    t, h = row // num_heads, row % num_heads
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_rt + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + t * stride_rt + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [num_tokens, hidden] or [num_tokens, num_heads, head_dim] (any token/head strides,
    last dim contiguous). With `residual` ([num_tokens, hidden], updated in place to
    x + residual) returns (norm(x + residual), residual); else norm(x)."""
    assert x.stride(-1) == 1, "the normalized dim must be contiguous"
    x3 = x.unsqueeze(1) if x.dim() == 2 else x        # [num_tokens, num_heads, hidden]
    num_tokens, num_heads, hidden = x3.shape
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    if num_tokens:
        res = residual if residual is not None else x3  # placeholder pointer when unused
        _rmsnorm_kernel[(num_tokens * num_heads,)](
            x3, res, weight, out, res, num_heads, x3.stride(0), x3.stride(1), res.stride(0),
            out.stride(0), out.stride(1), eps, HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden),
            HAS_RESIDUAL=residual is not None, num_warps=4 if hidden <= 2048 else 8)
    out = out.view(x.shape)
    return out if residual is None else (out, residual)
