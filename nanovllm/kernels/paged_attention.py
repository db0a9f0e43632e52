"""Paged attention in Triton: varlen causal prefill and split-K (flash-decoding) decode.

Both kernels read K/V straight from the paged cache through a block table and compute
exactly what `torch_ref.paged_attention_ref` computes: causal softmax(q k^T * scale) v,
accumulated in float32 with the online softmax, returned in q's dtype. Scores are kept
in the log2 domain (scale * log2(e)), so exp2 replaces exp.

  q:            [num_tokens, num_heads, head_dim]  (decode: one row per sequence)
  k/v_cache:    [num_blocks, block_size, num_kv_heads, head_dim]
  block_tables: [num_seqs, max_blocks_per_seq] int32, padded with -1
  context_lens: [num_seqs] int32, keys per sequence (0 = CUDA-graph padding row)

GQA: each program handles all `group = num_heads // num_kv_heads` query heads of one
kv head, so every K/V tile is read once per kv head, not once per query head.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Decode splits: split a sequence's keys only while num_seqs * num_kv_heads programs are
# fewer than DECODE_PROGRAMS_PER_SM per SM, give each split at least MIN_KEYS_PER_SPLIT keys,
# and never more than MAX_SPLITS (the reduction loads all of a head's splits as one block).
# Measured on an H100 (Qwen3-0.6B heads, context 1024-2048): 1 split from 32 sequences up,
# 2 at 16, 4 at 8, 16-32 at 1; more splits than that only add reduction work.
DECODE_PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 32


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _d_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_D] head_dim mask; a constant when head_dim is already a power of two."""
    if HEAD_DIM == BLOCK_D:
        mask = tl.full([BLOCK_D], 1, tl.int1)
    else:
        mask = offs_d < HEAD_DIM
    return mask


@triton.jit
def _kv_rows(block_table_ptr, start_n, offs_n, key_mask, stride_block, stride_slot,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N] int64 element offsets of the cache rows of keys start_n + offs_n."""
    if BLOCK_SIZE % BLOCK_N == 0:
        # NOTE: start_n is a multiple of BLOCK_N, so the tile lies in one page: one
        # block-table read, and the tile is BLOCK_N consecutive rows of that page.
        page = tl.load(block_table_ptr + start_n // BLOCK_SIZE).to(tl.int64)
        rows = page * stride_block + (start_n % BLOCK_SIZE + offs_n) * stride_slot
    else:  # the tile spans several pages: look a page up per key
        pos = start_n + offs_n
        page = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
        rows = page * stride_block + (pos % BLOCK_SIZE) * stride_slot
    return rows


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # NOTE: Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits;
        # in float32 the products of bf16 (or fp16) values are exact, so nothing changes.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _online_softmax(qk, v, acc, m_i, l_i, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one key tile into the running (acc, max, sum); qk [M, N] is log2-scaled, -inf masked."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [M]
    # NOTE: a row with every key masked so far keeps m = -inf; exponentiate against 0
    # instead so it contributes exact zeros rather than NaN (inf - inf).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


# ----------------------------------------------------------------------------- prefill
@triton.jit
def _prefill_tile(acc, m_i, l_i, q, k_base, v_base, bt_ptr, start_n, kv_end, pos_m,
                  offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
                  CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    k_pos = start_n + offs_n  # [BLOCK_N]
    key_mask = k_pos < kv_end
    k_rows = _kv_rows(bt_ptr, start_n, offs_n, key_mask, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N)
    v_rows = _kv_rows(bt_ptr, start_n, offs_n, key_mask, stride_vb, stride_vs, BLOCK_SIZE, BLOCK_N)
    if CAUSAL:  # the tile crosses the diagonal or the end of the keys
        kv_mask = key_mask[:, None] & d_mask[None, :]
    else:  # every key of the tile is visible to every row
        kv_mask = d_mask[None, :]
    k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = _dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        qk = tl.where(k_pos[None, :] <= pos_m[:, None], qk, float("-inf"))
    return _online_softmax(qk, v, acc, m_i, l_i, DOT_PRECISION, UPCAST)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
    d_mask = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
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
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_base, v_base, bt_ptr, start_n, kv_end, pos_m,
                                      offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
                                      qk_scale, False, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_base, v_base, bt_ptr, start_n, kv_end, pos_m,
                                      offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
                                      qk_scale, True, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # NOTE: rows without keys (ctx 0) output zeros, not NaN
    out = acc / l_i[:, None]
    out_rows = (q_start + q_idx).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------- decode
@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    context_lens_ptr, block_tables_ptr, qk_scale, num_splits,
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DIRECT: tl.constexpr,
):
    # grid (seq, kv head, split): one split of one sequence's keys, for all GROUP query heads
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    # NOTE: splits are sized from ctx inside the kernel, so the grid (and a captured CUDA
    # graph) never depends on tensor contents; split starts stay multiples of BLOCK_N.
    keys_per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    head = kv_head * GROUP + offs_g  # [BLOCK_G]
    g_mask = offs_g < GROUP
    q_rows = seq.to(tl.int64) * stride_qs + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    for start_n in range(start, end, BLOCK_N):
        key_mask = start_n + offs_n < end  # [BLOCK_N]
        k_rows = _kv_rows(bt_ptr, start_n, offs_n, key_mask, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N)
        v_rows = _kv_rows(bt_ptr, start_n, offs_n, key_mask, stride_vb, stride_vs, BLOCK_SIZE, BLOCK_N)
        kv_mask = key_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, UPCAST) * qk_scale  # [BLOCK_G, BLOCK_N]
        qk = tl.where(key_mask[None, :], qk, float("-inf"))
        acc, m_i, l_i = _online_softmax(qk, v, acc, m_i, l_i, DOT_PRECISION, UPCAST)

    has_keys = l_i > 0.0  # NOTE: empty splits and ctx-0 padding rows: zeros, lse -inf, no NaN
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:  # a single split is already the answer: skip the reduction kernel
        out_rows = seq.to(tl.int64) * stride_os + head * stride_oh
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_rows = seq.to(tl.int64) * stride_ps + head * stride_ph + split * stride_pk
        tl.store(part_out_ptr + part_rows[:, None] + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # log2-domain log-sum-exp
        tl.store(part_lse_ptr + seq.to(tl.int64) * stride_ls + head * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid (seq, head): weight each split's normalized output by exp2(lse - max lse)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = _d_mask(offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.load(part_lse_ptr + seq * stride_ls + head * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))  # [BLOCK_S]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: weights 0
    weight = tl.exp2(lse - lse_max)
    part_rows = seq * stride_ps + head * stride_ph + offs_s * stride_pk
    part = tl.load(part_out_ptr + part_rows[:, None] + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    total = tl.sum(weight, 0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(part * weight[:, None], 0) / total  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


# ----------------------------------------------------------------------------- launchers
class _Config(NamedTuple):
    block_m: int  # prefill rows (queries x group heads) per program; decode: unused
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def _prefill_config(q: torch.Tensor) -> _Config:
    if not q.is_cuda:  # Triton interpreter: small tiles keep the CPU tests fast
        return _Config(32, 32, 4, 1)
    # H100, head_dim 128, 1-16 prompts of 1024 tokens: as fast as flash_attn_varlen_func
    return _Config(64, 64, 4, 2)


def _decode_config(q: torch.Tensor) -> _Config:
    if not q.is_cuda:
        return _Config(0, 32, 4, 1)
    # H100, batch 64-256: ~2.5-2.9 TB/s of KV, flat across tiles 32-128 and 2-4 warps
    return _Config(0, 64, 4, 3)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact IEEE dots (the reference is float32); others use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter has no SMs; any small number exercises splitting
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """Decode split count from Python ints only (fixed per CUDA graph, never tensor contents).

    Split a sequence's keys only when num_seqs * num_kv_heads programs leave SMs idle.
    """
    programs = num_seqs * num_kv_heads
    wanted = DECODE_PROGRAMS_PER_SM * num_sms // programs
    useful = triton.cdiv(max_context_len, MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, max_seqlen_q: int, scale: float) -> torch.Tensor:
    """Varlen causal attention of each sequence's new queries over its paged keys.

    Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1], the last q_len of its
    context_lens[b] keys. Rows outside every sequence, and sequences with no keys, get zeros.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    group = num_heads // num_kv_heads
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = _rows_contiguous(q)
    out = torch.zeros_like(q)  # matches the reference for rows no sequence owns
    if num_tokens == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    cfg = _prefill_config(q)
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    grid = (triton.cdiv(max_seqlen_q, block_m // group), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST=not q.is_cuda,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                           num_splits: int | None = None, max_context_len: int | None = None) -> torch.Tensor:
    """One query per sequence (its last position) over its paged keys; ctx-0 rows get zeros.

    num_splits: key splits per sequence; by default chosen by `choose_num_splits` from the
    batch shape and max_context_len (default: block_tables.shape[1] * block_size), all
    Python ints that stay fixed across CUDA-graph replays.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert context_lens.shape[0] == num_seqs, "decode takes exactly one query row per sequence"
    q = _rows_contiguous(q)
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_context_len = max_context_len or block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, _num_sms(q.device))
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    cfg = _decode_config(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_splits == 1
    # scratch: each split's normalized output and log2-sum-exp (graph-pool memory under capture)
    part_shape = (num_seqs, num_heads, 1 if direct else num_splits)
    part_out = torch.empty(*part_shape, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, context_lens, block_tables,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST=not q.is_cuda, DIRECT=direct,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
