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


# Tokens per program. One (token, head) per program left prefill steps of thousands of tokens at
# ~1.1 TB/s on an H100 (each program moved 256 bytes); tiles of 16 tokens of one head ran 2.1x
# faster at 4,096-16,384 tokens and 1.5x at 256, but 0.2-0.5 us slower (one warp against four)
# up to 64 tokens, where decode steps sit (H100, CUDA graphs of 20 calls; docs/benchmarks.md).
LARGE_TILE_FROM = 128   # tokens


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
                         v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         num_tokens, num_q_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos, eps,
                         stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_NORM: tl.constexpr,
                         STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    # grid (token tile, head): BLOCK_T tokens of one head, q heads first, then k heads; each
    # row is normed and rotated on its own, so a token's result never depends on its tile
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    is_q = h < num_q_heads
    if is_q:
        src, src_stride = q_ptr + h * stride_qh, stride_qt
        dst, dst_stride = q_out_ptr + h * stride_qoh, stride_qot
        w_ptr = qw_ptr
    else:
        src, src_stride = k_ptr + (h - num_q_heads) * stride_kh, stride_kt
        dst, dst_stride = k_out_ptr + (h - num_q_heads) * stride_koh, stride_kot
        w_ptr = kw_ptr
    t_mask = tokens < num_tokens
    t64 = tokens.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = t_mask[:, None] & (cols < HALF)[None, :]   # [BLOCK_T, BLOCK]
    src_rows = src + (t64 * src_stride)[:, None] + cols[None, :]
    x1 = tl.load(src_rows, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_rows + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        dtype = q_out_ptr.dtype.element_ty
        x1 = ((x1 * inv_rms[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * inv_rms[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + tokens, mask=t_mask, other=0)
    trig = pos[:, None] * stride_cos + cols[None, :]
    cos = tl.load(cos_ptr + trig, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + trig, mask=mask, other=0.0)
    y1 = (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty)
    dst_rows = dst + (t64 * dst_stride)[:, None] + cols[None, :]
    tl.store(dst_rows, y1, mask=mask)
    tl.store(dst_rows + HALF, y2, mask=mask)
    if STORE and not is_q:  # a k head's program also stores its tokens' k and v in the cache
        kv_head = h - num_q_heads
        slot = tl.load(slot_ptr + tokens, mask=t_mask, other=-1).to(tl.int64)
        keep = mask & (slot >= 0)[:, None]  # NOTE: slot -1 is never written (CUDA-graph padding rows)
        row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        cache_rows = row[:, None] + cols[None, :]
        tl.store(k_cache_ptr + cache_rows, y1, mask=keep)
        tl.store(k_cache_ptr + cache_rows + HALF, y2, mask=keep)
        v_rows = v_ptr + (t64 * stride_vt + kv_head * stride_vh)[:, None] + cols[None, :]
        tl.store(v_cache_ptr + cache_rows, tl.load(v_rows, mask=keep), mask=keep)
        tl.store(v_cache_ptr + cache_rows + HALF, tl.load(v_rows + HALF, mask=keep), mask=keep)


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
        block_t, warps = (16, 4) if num_tokens >= LARGE_TILE_FROM else (1, 1)
        _qk_norm_rope_kernel[(triton.cdiv(num_tokens, block_t), num_q_heads + num_kv_heads)](
            q, k, q_out, k_out, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin, positions,
            v, k_cache, v_cache, slots,
            num_tokens, num_q_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), eps,
            v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(-2),
            HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2), HAS_NORM=has_norm,
            STORE=store is not None, BLOCK_SIZE=k_cache.shape[1] if store is not None else 1, BLOCK_T=block_t,
            num_warps=warps)
    return q_out, k_out
