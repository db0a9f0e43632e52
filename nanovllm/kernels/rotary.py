"""Fused per-head q/k RMSNorm (Qwen3) + rotary embedding, for q and k in one launch.

Replaces ~2 x 8 norm kernels and ~2 x 10 rotary kernels per layer with one. Rounding
follows the PyTorch path: the normed head is rounded to the activation dtype, rotated in
float32 with float32 cos/sin, and rounded once more. Given a half-precision paged KV
cache and the slot mapping, it also stores the rotated k and v in the cache (what
`kv_store.store_kv` writes, bit for bit), saving that kernel per layer.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
                         v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         num_q_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos, eps,
                         stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_NORM: tl.constexpr,
                         STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
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
    y1 = (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty)
    tl.store(dst + cols, y1, mask=mask)
    tl.store(dst + HALF + cols, y2, mask=mask)
    if STORE and not is_q:  # the k head's program also stores this head's k and v in the cache
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # NOTE: slot -1 is never written (CUDA-graph padding rows)
            kv_head = h - num_q_heads
            row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            tl.store(k_cache_ptr + row + cols, y1, mask=mask)
            tl.store(k_cache_ptr + row + HALF + cols, y2, mask=mask)
            v_src = v_ptr + t * stride_vt + kv_head * stride_vh
            tl.store(v_cache_ptr + row + cols, tl.load(v_src + cols, mask=mask), mask=mask)
            tl.store(v_cache_ptr + row + HALF + cols, tl.load(v_src + HALF + cols, mask=mask), mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] (any
    token/head strides, last dim contiguous); cos/sin: [max_position, head_dim / 2] float32.
    Returns new contiguous (q, k), normed (when weights are given) and rotated.

    store: (v, k_cache, v_cache, slot_mapping) to also write the rotated k and v to the
    cache slots (k's dtype; [num_blocks, block_size, num_kv_heads, head_dim]; slot -1 skips)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        has_norm = q_weight is not None
        v, k_cache, v_cache, slots = store if store is not None else (k, k, k, positions)
        if store is not None:
            assert k_cache.dtype == k.dtype and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
            assert v.stride(-1) == 1 and slots.shape[0] == num_tokens
        _qk_norm_rope_kernel[(num_tokens, num_q_heads + num_kv_heads)](
            q, k, q_out, k_out, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin, positions,
            v, k_cache, v_cache, slots,
            num_q_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), eps,
            v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(-2),
            HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2), HAS_NORM=has_norm,
            STORE=store is not None, BLOCK_SIZE=k_cache.shape[1] if store is not None else 1, num_warps=1)
    return q_out, k_out
