"""Varlen causal prefill over the paged KV cache (Triton).

Reads K/V straight from the paged cache through a block table and computes exactly what
`torch_ref.paged_attention_ref` computes: causal softmax(q k^T * scale) v, accumulated in
float32 with the online softmax, returned in q's dtype.

  q:            [num_tokens, num_heads, head_dim]
  k/v_cache:    [num_blocks, block_size, num_kv_heads, head_dim]
  cu_seqlens_q: [num_seqs + 1] int32, prefix sums of the query lengths
  block_tables: [num_seqs, max_blocks_per_seq] int32, padded with -1
  context_lens: [num_seqs] int32, keys per sequence (0 = CUDA-graph padding row)
  k/v_scale:    [num_blocks, block_size, num_kv_heads] float32, fp8 (e4m3) caches only

An fp8 cache is read as is and dequantized in registers: e4m3 values widen exactly to
q's dtype, K's per-key scales multiply the scores and V's the softmax weights.

GQA: each program handles all `group = num_heads // num_kv_heads` query heads of one
kv head, so every K/V tile is read once per kv head, not once per query head.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_common import (LOG2E, KernelConfig, dot_precision, head_dim_mask, load_scales,
                                               online_softmax, paged_rows, rows_contiguous, tile_dot)
from nanovllm.kernels.fp8 import is_fp8, scale_strides


@triton.jit
def _prefill_tile(acc, m_i, l_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, start_n, kv_end, pos_m,
                  offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss,
                  qk_scale, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr):
    k_pos = start_n + offs_n  # [BLOCK_N]
    key_mask = k_pos < kv_end
    k_rows = paged_rows(bt_ptr, start_n, offs_n, key_mask, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N)
    v_rows = paged_rows(bt_ptr, start_n, offs_n, key_mask, stride_vb, stride_vs, BLOCK_SIZE, BLOCK_N)
    if CAUSAL:  # the tile crosses the diagonal or the end of the keys
        kv_mask = key_mask[:, None] & d_mask[None, :]
    else:  # every key of the tile is visible to every row
        kv_mask = d_mask[None, :]
    k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = tile_dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
    if FP8:  # e4m3 widens to q's dtype exactly; the scales multiply scores and weights
        k_scale, v_scale = load_scales(ks_base, vs_base, bt_ptr, start_n, offs_n, key_mask, stride_sb, stride_ss,
                                       BLOCK_SIZE, BLOCK_N)
        qk = qk * (k_scale * qk_scale)[None, :]
        v = v.to(q.dtype)
    else:
        v_scale = None
        qk = qk * qk_scale
    if CAUSAL:
        qk = tl.where(k_pos[None, :] <= pos_m[:, None], qk, float("-inf"))
    return online_softmax(qk, v, v_scale, acc, m_i, l_i, DOT_PRECISION, UPCAST, FP8)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, stride_sb, stride_ss,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):
    # grid (query block, seq, kv head); rows are BLOCK_Q queries x GROUP heads, head fastest
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_rows = (q_start + q_idx).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_D]

    # query j sits at position ctx - q_len + j and sees keys 0..that position
    pos_m = ctx - q_len + q_idx
    first_pos = ctx - q_len + q_block * BLOCK_Q
    kv_end = tl.minimum(first_pos + BLOCK_Q, ctx)  # one past the block's last query
    full_end = tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, 0)  # tiles no row needs masked

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    if FP8:  # scales: [num_blocks, block_size, num_kv_heads], heads contiguous
        ks_base = k_scale_ptr + kv_head
        vs_base = v_scale_ptr + kv_head
    else:
        ks_base = k_scale_ptr
        vs_base = v_scale_ptr
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, start_n,
                                      kv_end, pos_m, offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb,
                                      stride_vs, stride_sb, stride_ss, qk_scale, False, BLOCK_SIZE, BLOCK_N,
                                      DOT_PRECISION, UPCAST, FP8)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, start_n,
                                      kv_end, pos_m, offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb,
                                      stride_vs, stride_sb, stride_ss, qk_scale, True, BLOCK_SIZE, BLOCK_N,
                                      DOT_PRECISION, UPCAST, FP8)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # NOTE: rows without keys (ctx 0) output zeros, not NaN
    out = acc / l_i[:, None]
    out_rows = (q_start + q_idx).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def _prefill_config(q: torch.Tensor) -> KernelConfig:
    if not q.is_cuda:  # Triton interpreter: small tiles keep the CPU tests fast
        return KernelConfig(32, 32, 4, 1)
    # H100, head_dim 128, 1-16 prompts of 1024 tokens: as fast as flash_attn_varlen_func
    return KernelConfig(64, 64, 4, 2)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, max_seqlen_q: int, scale: float,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention of each sequence's new queries over its paged keys.

    Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1], the last q_len of its
    context_lens[b] keys. Rows outside every sequence, and sequences with no keys, get zeros.
    An fp8 cache needs k_scale/v_scale (see `nanovllm.kernels.fp8`).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    group = num_heads // num_kv_heads
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    stride_sb, stride_ss = scale_strides(k_cache, k_scale, v_scale)
    q = rows_contiguous(q)
    out = torch.zeros_like(q)  # matches the reference for rows no sequence owns
    if num_tokens == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    cfg = _prefill_config(q)
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    grid = (triton.cdiv(max_seqlen_q, block_m // group), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), stride_sb, stride_ss,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=not q.is_cuda, FP8=is_fp8(k_cache.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
