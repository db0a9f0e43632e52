"""Fused mixture-of-experts on CUDA: two grouped GEMMs over expert-aligned blocks.

0. `topk_softmax`: the router's softmax and top-k in one kernel. CUDA-graph padding rows
   (slot -1) are routed to no expert: id `num_experts`, weight 0. Left in, their stale
   tokens would make the step read up to their experts' weights too (a batch of 17 padded
   to 32 touches ~112 of Qwen3-30B-A3B's 128 experts instead of ~85).
1. `align_by_expert`: the num_tokens * top_k (token, expert) pairs, grouped by expert and
   each expert's run padded to a multiple of BLOCK_M, so every BLOCK_M rows share one
   expert: one program at decode sizes, else count, scan, scatter (three kernels). No host
   sync: sizes depend only on num_tokens (at most num_pairs + min(E, num_pairs) * (BLOCK_M - 1)
   rows), so a CUDA graph can capture it.
2. `_expert_gemm_kernel` (gated): per block, x rows @ the expert's [gate; up]^T, then silu(gate) * up.
3. `_expert_gemm_kernel`: those rows @ the expert's down^T, times the pair's routing weight.
4. `_sum_topk_kernel`: each token's top_k rows summed in a fixed order (deterministic); a
   pair routed to no expert adds nothing (padding rows come out zero).
Decode is bound by reading the touched experts' weights: BLOCK_M is chosen per batch-size
bucket (`TILE_TABLE`) so that most experts fill one block and are read once.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class MoeTiles(NamedTuple):
    block_m: int      # rows (token-expert pairs) per program: each program reads one expert's tile
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (largest num_tokens, gate/up tiles, down tiles or None: the same), measured with
# benchmarks/fused_moe.py --sweep / --sweep-down (docs/moe.md). Qwen3-30B-A3B routes num_tokens * 8
# pairs over 128 experts: ~1 row per touched expert at 16 tokens, 4 at 64, 16 at 256, 32 at 512,
# so decode's BLOCK_M holds most experts in one block (each expert's weights read once); prefill
# is compute bound and wants 128 x 128 tiles, 128 x 256 for down (K = moe_intermediate is short).
TILE_TABLE: tuple[tuple[int, MoeTiles, MoeTiles | None], ...] = (
    (16, MoeTiles(16, 32, 128, 4, 4), None),
    (64, MoeTiles(16, 64, 128, 4, 3), None),
    (256, MoeTiles(32, 64, 128, 4, 3), None),
    (2048, MoeTiles(64, 128, 64, 4, 4), None),
    (1 << 62, MoeTiles(128, 128, 64, 8, 3), MoeTiles(128, 256, 64, 8, 3)),
)


def tiles_for(num_tokens: int) -> tuple[MoeTiles, MoeTiles]:
    """(gate/up tiles, down tiles) for a batch of num_tokens."""
    tiles, down = next((tiles, down) for limit, tiles, down in TILE_TABLE if num_tokens <= limit)
    return tiles, down or tiles


class ExpertBlocks(NamedTuple):
    pair_ids: torch.Tensor       # [max_rows] int32: pair (token * top_k + slot) per row; num_pairs = padding
    block_experts: torch.Tensor  # [max_rows // BLOCK_M] int32: each block's expert; -1 = unused block


PAIRS_PER_PROGRAM = 1024   # the general path's count and scatter programs
ONE_PROGRAM_PAIRS = 4096   # up to this many pairs (512 tokens at top-8), one program aligns them


@triton.jit
def _topk_softmax_kernel(logits_ptr, slots_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride,
                         TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Softmax over the experts in float32, then the top k, ties to the lowest expert id;
    rows whose slot is -1 (HAS_SLOTS) get id num_experts and weight 0: no expert."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    padding = tl.full((BLOCK_T,), 0, tl.int1)
    if HAS_SLOTS:
        padding = tl.load(slots_ptr + rows, mask=row_ok, other=0) < 0
    safe_rows = tl.minimum(rows, num_tokens - 1)  # rows past the end repeat the last one (never stored)
    logits = tl.load(logits_ptr + safe_rows[:, None] * stride + cols[None, :],
                     mask=cols[None, :] < num_experts, other=float("-inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = probs / tl.sum(probs, 1)[:, None]               # [BLOCK_T, BLOCK_E]; padding columns are 0
    scale = tl.full((BLOCK_T,), 1.0, tl.float32)
    if RENORMALIZE:  # a first pass for the sum of the top k
        left, total = probs, tl.zeros((BLOCK_T,), tl.float32)
        for _ in tl.static_range(TOP_K):
            best = tl.max(left, 1)
            pick = tl.min(tl.where(left == best[:, None], cols[None, :], BLOCK_E), 1)
            left = tl.where(cols[None, :] == pick[:, None], -1.0, left)  # NOTE: below every probability
            total += best
        scale = 1.0 / total
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, 1)
        pick = tl.min(tl.where(probs == best[:, None], cols[None, :], BLOCK_E), 1)  # the lowest id of a tie
        probs = tl.where(cols[None, :] == pick[:, None], -1.0, probs)
        tl.store(weights_ptr + rows * TOP_K + j, tl.where(padding, 0.0, best * scale), mask=row_ok)
        tl.store(ids_ptr + rows * TOP_K + j, tl.where(padding, num_experts, pick), mask=row_ok)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`layers.fused_moe.select_experts` in one kernel: (weights float32, ids int32), [num_tokens, top_k]."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    if num_tokens:
        _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
            router_logits, slot_mapping, weights, ids, num_tokens, num_experts, router_logits.stride(0),
            TOP_K=top_k, RENORMALIZE=renormalize, HAS_SLOTS=slot_mapping is not None, BLOCK_T=block_t,
            BLOCK_E=block_e, num_warps=4)
    return weights, ids


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=num_experts)
    ok = expert < num_experts  # id num_experts: routed to no expert
    tl.atomic_add(counts_ptr + expert, 1, mask=ok, sem="relaxed")


@triton.jit
def _place_runs(counts, experts, cursor_ptr, block_experts_ptr, num_experts, num_blocks,
                BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """From the counts per expert: each expert's first row (its run padded to BLOCK_M) into
    `cursor_ptr`, and each block's expert (-1 past the last run) into `block_experts_ptr`."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, 0) - padded
    tl.store(cursor_ptr + experts, starts, mask=experts < num_experts)
    # each run's blocks get its expert: a pass per block of the longest run (usually one or two)
    first_block, run_blocks = starts // BLOCK_M, padded // BLOCK_M
    for j in range(0, tl.max(run_blocks, 0)):
        tl.store(block_experts_ptr + first_block + j, experts, mask=j < run_blocks)
    for first in range(tl.sum(run_blocks, 0), num_blocks, BLOCK_B):  # the unused tail: -1
        blocks = first + tl.arange(0, BLOCK_B)
        tl.store(block_experts_ptr + blocks, -1, mask=blocks < num_blocks)


@triton.jit
def _scan_kernel(counts_ptr, cursor_ptr, block_experts_ptr, num_experts, num_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    _place_runs(counts, experts, cursor_ptr, block_experts_ptr, num_experts, num_blocks, BLOCK_M, BLOCK_B)


@triton.jit
def _scatter_kernel(ids_ptr, cursor_ptr, pair_ids_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=num_experts)
    ok = expert < num_experts
    # NOTE: any order within an expert (rows are independent), so relaxed: no fence per atomic
    row = tl.atomic_add(cursor_ptr + expert, 1, mask=ok, sem="relaxed")
    tl.store(pair_ids_ptr + row, offs, mask=ok)


@triton.jit
def _align_one_program_kernel(ids_ptr, cursor_ptr, pair_ids_ptr, block_experts_ptr, num_pairs, num_experts,
                              num_rows, num_blocks, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """Fill, count, scan and scatter in one program, for decode-sized batches (every pair in
    registers): one launch where the general path needs two fills and three kernels."""
    for first in range(0, num_rows, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        tl.store(pair_ids_ptr + rows, num_pairs, mask=rows < num_rows)  # padding, overwritten below
    pairs = tl.arange(0, BLOCK_P)
    ok = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=ok, other=num_experts)  # past the end: bin num_experts, never placed
    ok &= ids < num_experts  # routed to no expert (padding): never placed either
    experts = tl.arange(0, BLOCK_E)
    counts = tl.where(experts < num_experts, tl.histogram(ids, BLOCK_E), 0)
    _place_runs(counts, experts, cursor_ptr, block_experts_ptr, num_experts, num_blocks, BLOCK_M, BLOCK_B)
    tl.debug_barrier()  # the cursors and the padding are written before any thread places a pair
    row = tl.atomic_add(cursor_ptr + ids, 1, mask=ok, sem="relaxed")
    tl.store(pair_ids_ptr + row, pairs, mask=ok)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the pairs of `topk_ids` [num_tokens, top_k] by expert, each expert's run padded
    to a multiple of `block_m` rows. No host sync: every size depends on shapes only."""
    num_pairs = topk_ids.numel()
    ids = topk_ids.flatten().to(torch.int32)
    max_rows = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    cursor = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    block_experts = torch.empty(max_rows // block_m, dtype=torch.int32, device=ids.device)
    if num_pairs <= ONE_PROGRAM_PAIRS:
        pair_ids = torch.empty(max_rows, dtype=torch.int32, device=ids.device)
        _align_one_program_kernel[(1,)](
            ids, cursor, pair_ids, block_experts, num_pairs, num_experts, max_rows, len(block_experts),
            BLOCK_M=block_m, BLOCK_P=triton.next_power_of_2(num_pairs),
            BLOCK_E=triton.next_power_of_2(num_experts + 1), BLOCK_B=1024, BLOCK_R=1024, num_warps=8)
        return ExpertBlocks(pair_ids, block_experts)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    pair_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=ids.device)
    grid = (triton.cdiv(num_pairs, PAIRS_PER_PROGRAM),)
    _count_kernel[grid](ids, counts, num_pairs, num_experts, BLOCK=PAIRS_PER_PROGRAM)
    _scan_kernel[(1,)](counts, cursor, block_experts, num_experts, len(block_experts), BLOCK_M=block_m,
                       BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=1024)
    _scatter_kernel[grid](ids, cursor, pair_ids, num_pairs, num_experts, BLOCK=PAIRS_PER_PROGRAM)
    return ExpertBlocks(pair_ids, block_experts)


@triton.jit
def _expert_gemm_kernel(a_ptr, w_ptr, out_ptr, pair_ids_ptr, block_experts_ptr, weights_ptr, num_pairs,
                        pairs_per_a_row, n_size, k_size, stride_a, stride_we, stride_wn, stride_out,
                        GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One block of pairs (all of one expert e) x one tile of n:
    GATED (gate/up): out[pair, n] = silu(a[row] . w[e, n]) * (a[row] . w[e, n_size + n]), row = pair // top_k;
    else (down):     out[pair, n] = routing_weight[pair] * (a[pair] . w[e, n]).
    Programs run a block's n tiles one after another, so its gathered rows stay in L2 across
    them (as do an expert's weights across its blocks); with the blocks varying fastest, a
    prefill's rows (hundreds of MB) were read from memory again for every n tile."""
    num_n_tiles = tl.cdiv(n_size, BLOCK_N)
    block = tl.program_id(0) // num_n_tiles
    expert = tl.load(block_experts_ptr + block)
    if expert < 0:
        return
    pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    a_rows = (pairs // pairs_per_a_row).to(tl.int64)
    cols = tl.program_id(0) % num_n_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + ks[None, :]                                    # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_size, BLOCK_K):
        k_ok = k + ks < k_size
        a = tl.load(a_ptrs + k, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc = tl.dot(a, tl.load(w_ptrs + k, mask=w_mask, other=0.0), acc, input_precision=PRECISION)
        if GATED:
            up = tl.load(w_ptrs + n_size * stride_wn + k, mask=w_mask, other=0.0)
            acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    else:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def _expert_gemm(a, w, out, blocks: ExpertBlocks, weights, pairs_per_a_row: int, gated: bool,
                 tiles: MoeTiles) -> None:
    n_size, k_size = out.shape[1], a.shape[1]
    # float32 inputs: full-precision dots (tl.dot would use TF32); bf16/fp16 ignore this
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    # NOTE: the table's stages are sized for 2-byte inputs; float32 tiles take twice the shared
    # memory ((64, 128, 64) at 4 stages: 240 KiB, over the H100/H200's 227), so at most 3
    stages = tiles.num_stages if a.element_size() <= 2 else min(tiles.num_stages, 3)
    _expert_gemm_kernel[(blocks.block_experts.numel() * triton.cdiv(n_size, tiles.block_n),)](
        a, w, out, blocks.pair_ids, blocks.block_experts, weights, out.shape[0], pairs_per_a_row, n_size, k_size,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), GATED=gated, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PRECISION=precision, num_warps=tiles.num_warps,
        num_stages=stages)


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, tiles: MoeTiles | None = None,
                  down_tiles: MoeTiles | None = None) -> torch.Tensor:
    """x [num_tokens, hidden], gate_up [E, 2 * inter, hidden], down [E, hidden, inter],
    topk_weights (float32) / topk_ids [num_tokens, top_k] -> [num_tokens, hidden]:
    sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), where id E adds nothing (a
    CUDA-graph padding row, see `topk_softmax`). Tiles default to `TILE_TABLE`'s; `down_tiles`
    (default: `tiles` when given) may differ from `tiles` in all but block_m, which the
    alignment fixes for both GEMMs."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, inter = down.shape[0], down.shape[2]
    if num_tokens == 0:
        return torch.zeros_like(x)
    if tiles is None:
        tiles, default_down = tiles_for(num_tokens)
    else:  # a caller's tiles (benchmarks) serve both GEMMs unless down_tiles says otherwise
        default_down = tiles
    down_tiles = (down_tiles or default_down)._replace(block_m=tiles.block_m)
    blocks = align_by_expert(topk_ids, num_experts, tiles.block_m)
    num_pairs = num_tokens * top_k
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)       # silu(gate) * up per pair
    _expert_gemm(x, gate_up, h, blocks, topk_weights, top_k, gated=True, tiles=tiles)
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)    # weighted expert output per pair
    _expert_gemm(h, down, out, blocks, topk_weights.float().contiguous(), 1, gated=False, tiles=down_tiles)
    return sum_topk(out.view(num_tokens, top_k, hidden), topk_ids.contiguous(), num_experts)


@triton.jit
def _sum_topk_kernel(src_ptr, ids_ptr, out_ptr, hidden, num_experts, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < hidden
    src = src_ptr + token * TOP_K * hidden + cols
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # slot order, in float32: the same sum on every run
        # a pair routed to no expert has no row written: skip it
        expert = tl.load(ids_ptr + token * TOP_K + k + tl.zeros_like(cols), mask=ok, other=num_experts)
        acc += tl.load(src + k * hidden, mask=expert < num_experts, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_topk(pair_out: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_tokens, top_k, hidden] -> [num_tokens, hidden], summed in slot order in float32;
    the slots whose id (`topk_ids`, contiguous) is >= num_experts (routed to no expert) are left out."""
    num_tokens, top_k, hidden = pair_out.shape
    out = torch.empty(num_tokens, hidden, dtype=pair_out.dtype, device=pair_out.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_topk_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        pair_out, topk_ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out
