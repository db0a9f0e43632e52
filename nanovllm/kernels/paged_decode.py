"""Split-K (flash-decoding) paged decode attention (Triton).

One query row per sequence (its last position) over its paged keys, computing exactly
what `torch_ref.paged_attention_ref` computes, accumulated in float32. A sequence's keys
may be cut into splits that run as separate programs; a reduction kernel then merges the
splits' outputs by their log-sum-exp.

  q:            [num_seqs, num_heads, head_dim]
  k/v_cache:    [num_blocks, block_size, num_kv_heads, head_dim]
  block_tables: [num_seqs, max_blocks_per_seq] int32, padded with -1
  context_lens: [num_seqs] int32, keys per sequence (0 = CUDA-graph padding row)
  k/v_scale:    [num_blocks, block_size, num_kv_heads] float32, fp8 (e4m3) caches only

An fp8 cache is read as is (half the bytes of bf16) and dequantized in registers: e4m3
values widen exactly to q's dtype, K's per-key scales multiply the scores and V's the
softmax weights.

GQA: each program handles all `group = num_heads // num_kv_heads` query heads of one
kv head, so every K/V tile is read once per kv head, not once per query head.

Shared prefixes: the n samples of one prompt, or prompts with one cached prefix, hold the
same first KV blocks. A unit of such sequences shares one program per (kv head, split): the
tile's rows are the query heads of all its members, the shared keys are read once for all
of them, then each member's own keys for its rows alone (the decode tile has rows to spare:
Qwen3-0.6B's group of 2 fills 2 of 16). A member's keys meet its rows in the same tiles and
order as without the unit, so the unit changes no bit of a single-split result.

Order: a batch mixes contexts of 100 and 2,000 keys, and the GPU starts programs in grid
order, so a long sequence started last holds the step while most SMs idle. Units are listed
longest first, so the short ones fill the end (longest-processing-time-first scheduling).
"""
import functools

import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_common import (LOG2E, KernelConfig, dot_precision, head_dim_mask, load_scales,
                                               online_softmax, paged_rows, rows_contiguous, tile_dot)
from nanovllm.kernels.fp8 import is_fp8, scale_strides
from nanovllm.utils.context import DECODE_TILE_ROWS

# Decode splits: split a sequence's keys only while num_seqs * num_kv_heads programs are
# fewer than DECODE_PROGRAMS_PER_SM per SM, give each split at least MIN_KEYS_PER_SPLIT keys,
# and never more than MAX_SPLITS (the reduction loads all of a head's splits as one block).
# Measured on an H100 (Qwen3-0.6B heads; `benchmarks/attention_kernels.py --sweep-splits`,
# docs/benchmarks.md): at mixed context lengths (100-2,048) 16 and 32 sequences ran 10 and
# 13 % faster at 4 and 2 splits than at 2 and 1, where uniform lengths lose 2-3 %; from 64
# sequences up 1 split is best at any lengths. 4 programs per SM gives exactly that.
DECODE_PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 32
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (the sequences): larger batches launch in parts


@triton.jit
def _split_range(offset, num_keys, split, num_splits, BLOCK_N: tl.constexpr):
    """Keys [start, end) of split `split` of the num_keys keys from offset (elementwise); starts
    stay offset plus multiples of BLOCK_N."""
    keys_per_split = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    start = offset + split * keys_per_split
    return start, tl.minimum(start + keys_per_split, offset + num_keys)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, rows, bt_ptr, start_n, end, k_base, v_base, ks_base, vs_base, qk_scale,
                 stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, offs_n, offs_d, d_mask,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 FP8: tl.constexpr):
    """Fold keys [start_n, min(start_n + BLOCK_N, end)) of one block table into the running
    softmax of the query rows where `rows` is set; the other rows see them masked, which
    leaves their running sums exactly as they were."""
    key_mask = start_n + offs_n < end  # [BLOCK_N]
    k_rows = paged_rows(bt_ptr, start_n, offs_n, key_mask, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N)
    v_rows = paged_rows(bt_ptr, start_n, offs_n, key_mask, stride_vb, stride_vs, BLOCK_SIZE, BLOCK_N)
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = tile_dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, UPCAST)  # [BLOCK_G, BLOCK_N]
    if FP8:  # e4m3 widens to q's dtype exactly; the scales multiply scores and weights
        k_scale, v_scale = load_scales(ks_base, vs_base, bt_ptr, start_n, offs_n, key_mask, stride_sb,
                                       stride_ss, BLOCK_SIZE, BLOCK_N)
        qk = qk * (k_scale * qk_scale)[None, :]
        v = v.to(q.dtype)
    else:
        v_scale = None
        qk = qk * qk_scale
    qk = tl.where(rows[:, None] & key_mask[None, :], qk, float("-inf"))
    return online_softmax(qk, v, v_scale, acc, m_i, l_i, DOT_PRECISION, UPCAST, FP8)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, context_lens_ptr, block_tables_ptr,
    units_ptr, shared_lens_ptr, k_scale_ptr, v_scale_ptr, qk_scale, num_splits, first_unit,
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, stride_sb, stride_ss,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_unit,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    DIRECT: tl.constexpr, FP8: tl.constexpr, UNIT_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid (kv head x split, unit): one split of one unit's keys for the GROUP query heads of
    # each of its members, tile row r = (member r // GROUP, head r % GROUP). Without units
    # (UNIT_SIZE 0) unit u is sequence u alone. A unit's programs start together.
    kv_head = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    unit = first_unit + tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    member = offs_g // GROUP  # [BLOCK_G]
    head = kv_head * GROUP + offs_g % GROUP
    if UNIT_SIZE > 0:
        unit_ptr = units_ptr + unit.to(tl.int64) * stride_unit
        row_seq = tl.load(unit_ptr + member, mask=member < UNIT_SIZE, other=-1)  # [BLOCK_G]
        seqs = tl.load(unit_ptr + offs_m, mask=offs_m < UNIT_SIZE, other=-1)  # [BLOCK_M]
        # NOTE: whole tiles only, so a member's own keys start where its tiles would alone
        shared = tl.load(shared_lens_ptr + unit) // BLOCK_N * BLOCK_N
    else:
        row_seq = tl.where(member == 0, unit, -1)
        seqs = tl.where(offs_m == 0, unit, -1)
        shared = 0
    g_mask = row_seq >= 0
    seq_rows = tl.maximum(row_seq, 0).to(tl.int64)
    q = tl.load(q_ptr + (seq_rows * stride_qs + head * stride_qh)[:, None] + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    # The unit's key tiles, one flat loop: first the shared keys [0, shared) of the first
    # member's table (the members' tables agree there) for every row, then each member's own
    # keys [shared, context length) for its rows alone. A member's keys thus meet its rows in
    # the same tiles and order as without the unit. Splits cut each of those ranges.
    # NOTE: splits are sized from the lengths inside the kernel, so the grid (and a captured
    # CUDA graph) never depends on tensor contents.
    ctxs = tl.load(context_lens_ptr + tl.maximum(seqs, 0), mask=seqs >= 0, other=0)  # [BLOCK_M]
    starts, ends = _split_range(shared, tl.maximum(ctxs - shared, 0), split, num_splits, BLOCK_N)
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_N)  # [BLOCK_M]
    tiles_after = tl.cumsum(tiles, 0)  # the own tiles up to each member's, its own included
    shared_start, shared_end = _split_range(0, shared, split, num_splits, BLOCK_N)
    shared_tiles = tl.cdiv(tl.maximum(shared_end - shared_start, 0), BLOCK_N)
    first = tl.maximum(tl.max(tl.where(offs_m == 0, seqs, -1), 0), 0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    if FP8:  # scales: [num_blocks, block_size, num_kv_heads], heads contiguous
        ks_base = k_scale_ptr + kv_head
        vs_base = v_scale_ptr + kv_head
    else:
        ks_base = k_scale_ptr
        vs_base = v_scale_ptr
    for t in range(0, shared_tiles + tl.sum(tiles, 0)):
        own = t - shared_tiles  # < 0: a shared tile
        j = tl.sum((tiles_after <= own).to(tl.int32), 0)  # whose own tile (the first member with tiles left)
        is_j = offs_m == j
        tile_in_j = own - tl.sum(tl.where(is_j, tiles_after - tiles, 0), 0)
        start_n = tl.where(own < 0, shared_start + t * BLOCK_N,
                           tl.sum(tl.where(is_j, starts, 0), 0) + tile_in_j * BLOCK_N)
        end = tl.where(own < 0, shared_end, tl.sum(tl.where(is_j, ends, 0), 0))
        seq = tl.where(own < 0, first, tl.sum(tl.where(is_j, seqs, 0), 0))
        rows = g_mask & ((own < 0) | (member == j))
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, rows, block_tables_ptr + seq.to(tl.int64) * stride_bt,
                                     start_n, end, k_base, v_base, ks_base, vs_base, qk_scale,
                                     stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, offs_n,
                                     offs_d, d_mask, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST, FP8)

    has_keys = l_i > 0.0  # NOTE: empty splits and ctx-0 padding rows: zeros, lse -inf, no NaN
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:  # a single split is already the answer: skip the reduction kernel
        out_rows = seq_rows * stride_os + head * stride_oh
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_rows = seq_rows * stride_ps + head * stride_ph + split * stride_pk
        tl.store(part_out_ptr + part_rows[:, None] + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # log2-domain log-sum-exp
        tl.store(part_lse_ptr + seq_rows * stride_ls + head * stride_lh + split, lse, mask=g_mask)


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
    d_mask = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
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


def _decode_config(q: torch.Tensor) -> KernelConfig:
    if not q.is_cuda:
        return KernelConfig(0, 32, 4, 1)
    # H100, batch 64-256: ~2.5-2.9 TB/s of KV, flat across tiles 32-128 and 2-4 warps
    return KernelConfig(0, 64, 4, 3)


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


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                           num_splits: int | None = None, max_context_len: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           units: torch.Tensor | None = None, shared_lens: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence (its last position) over its paged keys; ctx-0 rows get zeros.

    num_splits: key splits per sequence; by default chosen by `choose_num_splits` from the
    batch shape and max_context_len (default: block_tables.shape[1] * block_size), all
    Python ints that stay fixed across CUDA-graph replays. An fp8 cache needs k_scale/v_scale
    (see `nanovllm.kernels.fp8`). units [num_seqs, unit size] int32 and shared_lens [num_seqs]
    int32: the sequences grouped as `AttentionMetadata.decode_units` describes, in the order
    their programs start (longest first balances the SMs); a unit's first shared_lens[u] keys
    are read once for all its members. The output stays in batch order, in `out` when given
    (q's shape, head_dim contiguous).
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert context_lens.shape[0] == num_seqs, "decode takes exactly one query row per sequence"
    stride_sb, stride_ss = scale_strides(k_cache, k_scale, v_scale)
    block_g = max(DECODE_TILE_ROWS, triton.next_power_of_2(group))
    unit_size = 0 if units is None else units.shape[1]
    assert units is None or (units.shape[0] == num_seqs and units.stride(1) == 1 and unit_size * group <= block_g), \
        "a unit's query heads must fit the query tile (see decode_unit_size)"
    q = rows_contiguous(q)
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
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
    for first in range(0, num_seqs, MAX_GRID_Y):
        _decode_split_kernel[(num_kv_heads * num_splits, min(MAX_GRID_Y, num_seqs - first))](
            q, k_cache, v_cache, out, part_out, part_lse, context_lens, block_tables, units, shared_lens,
            k_scale, v_scale, scale * LOG2E, num_splits, first,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), stride_sb, stride_ss,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            units.stride(0) if units is not None else 0,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
            BLOCK_G=block_g, BLOCK_N=cfg.block_n,
            DOT_PRECISION=dot_precision(q.dtype), UPCAST=not q.is_cuda, DIRECT=direct, FP8=is_fp8(k_cache.dtype),
            UNIT_SIZE=unit_size, BLOCK_M=max(2, triton.next_power_of_2(unit_size)), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
