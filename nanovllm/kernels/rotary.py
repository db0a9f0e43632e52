"""Fused per-head q/k RMSNorm (Qwen3) + rotary embedding, for q and k in one launch.

Replaces ~2 x 8 norm kernels and ~2 x 10 rotary kernels per layer with one. Rounding
follows the PyTorch path: the normed head is rounded to the activation dtype, rotated in
float32 with float32 cos/sin, and rounded once more.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
                         num_q_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos, eps,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_NORM: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)                  # q heads first, then k heads
    is_q = h < num_q_heads
    if is_q:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = q_out_ptr + t * stride_qot + h * stride_qoh
        w_ptr = qw_ptr
    else:
        src = k_ptr + t * stride_kt + (h - num_q_heads) * stride_kh
        dst = k_out_ptr + t * stride_kot + (h - num_q_heads) * stride_koh
        w_ptr = kw_ptr
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = q_out_ptr.dtype.element_ty
        x1 = ((x1 * inv_rms).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * inv_rms).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_cos + cols, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + cols, mask=mask, other=0.0)
    tl.store(dst + cols, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + cols, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] (any
    token/head strides, last dim contiguous); cos/sin: [max_position, head_dim / 2] float32.
    Returns new contiguous (q, k), normed (when weights are given) and rotated."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        has_norm = q_weight is not None
        _qk_norm_rope_kernel[(num_tokens, num_q_heads + num_kv_heads)](
            q, k, q_out, k_out, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin, positions,
            num_q_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), eps,
            HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2), HAS_NORM=has_norm, num_warps=1)
    return q_out, k_out
