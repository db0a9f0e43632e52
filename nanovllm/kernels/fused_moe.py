"""Fused mixture-of-experts on CUDA: two grouped GEMMs over expert-aligned blocks.

1. `align_by_expert`: the num_tokens * top_k (token, expert) pairs, sorted by expert and
   each expert's run padded to a multiple of BLOCK_M, so every BLOCK_M rows share one
   expert. Torch ops on the device, no host sync: sizes depend only on num_tokens (at most
   num_pairs + min(E, num_pairs) * (BLOCK_M - 1) rows), so a CUDA graph can capture it.
2. `_gate_up_kernel`: per block, x rows @ the expert's [gate; up]^T, then silu(gate) * up.
3. `_down_kernel`: those rows @ the expert's down^T, times the pair's routing weight.
4. A sum over each token's top_k rows.
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


# (largest num_tokens, tiles). A starting point for the H200, to be measured by
# benchmarks/fused_moe.py. Qwen3-30B-A3B routes num_tokens * 8 pairs over 128 experts: ~1 row
# per touched expert at 16 tokens, 4 at 64, 16 at 256, 32 at 512, hence BLOCK_M 16/16/32/64.
TILE_TABLE: tuple[tuple[int, MoeTiles], ...] = (
    (16, MoeTiles(16, 32, 128, 4, 4)),
    (64, MoeTiles(16, 64, 128, 4, 3)),
    (256, MoeTiles(32, 64, 128, 4, 3)),
    (512, MoeTiles(64, 64, 128, 4, 3)),
    (1 << 62, MoeTiles(64, 128, 64, 8, 3)),   # prefill: compute bound, larger tiles
)


def tiles_for(num_tokens: int) -> MoeTiles:
    return next(tiles for limit, tiles in TILE_TABLE if num_tokens <= limit)


class ExpertBlocks(NamedTuple):
    pair_ids: torch.Tensor      # [max_rows] int32: pair (token * top_k + slot) per row; num_pairs = padding
    block_experts: torch.Tensor  # [max_rows // BLOCK_M] int32: each block's expert; -1 = unused block


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort the pairs of `topk_ids` [num_tokens, top_k] by expert, each expert's run padded
    to a multiple of `block_m` rows. No host sync: every size depends on shapes only."""
    num_pairs = topk_ids.numel()
    flat = topk_ids.flatten().long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # NOTE: not bincount, whose output size syncs
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)                              # [E]: each expert's padded run ends here
    order = torch.argsort(flat, stable=True)             # pair ids grouped by expert, in token order
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    max_rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    max_rows = triton.cdiv(max_rows, block_m) * block_m
    pair_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=flat.device)
    pair_ids[(ends - padded)[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=flat.device)
    experts = torch.searchsorted(ends, block_starts, right=True)  # the expert whose run holds the block
    block_experts = torch.where(block_starts < ends[-1], experts, -1).to(torch.int32)
    return ExpertBlocks(pair_ids, block_experts)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, pair_ids_ptr, block_experts_ptr, num_pairs, top_k, hidden, inter,
                    stride_x, stride_we, stride_wn, stride_out,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """out[pair, n] = silu(x[token] . w[e, n]) * (x[token] . w[e, inter + n]) for one block of pairs."""
    expert = tl.load(block_experts_ptr + tl.program_id(0))
    if expert < 0:
        return
    pairs = tl.load(pair_ids_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_x + ks[None, :]                              # [BLOCK_M, BLOCK_K]
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    up_ptrs = gate_ptrs + inter * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        k_ok = k + ks < hidden
        a = tl.load(x_ptrs + k, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_gate = tl.dot(a, tl.load(gate_ptrs + k, mask=w_mask, other=0.0), acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, tl.load(up_ptrs + k, mask=w_mask, other=0.0), acc_up, input_precision=PRECISION)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, pair_ids_ptr, block_experts_ptr, weights_ptr, num_pairs, inter, hidden,
                 stride_h, stride_we, stride_wn, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """out[pair, n] = weight[pair] * (h[pair] . w[e, n]) for one block of pairs."""
    expert = tl.load(block_experts_ptr + tl.program_id(0))
    if expert < 0:
        return
    pairs = tl.load(pair_ids_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = pairs.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inter, BLOCK_K):
        k_ok = k + ks < inter
        a = tl.load(h_ptrs + k, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc *= tl.load(weights_ptr + rows, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """x [num_tokens, hidden], gate_up [E, 2 * inter, hidden], down [E, hidden, inter],
    topk_weights (float32) / topk_ids [num_tokens, top_k] -> [num_tokens, hidden]:
    sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, inter = down.shape[0], down.shape[2]
    if num_tokens == 0:
        return torch.zeros_like(x)
    tiles = tiles or tiles_for(num_tokens)
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    blocks = align_by_expert(topk_ids, num_experts, bm)
    num_pairs, num_blocks = num_tokens * top_k, blocks.block_experts.numel()
    # float32 inputs: full-precision dots (tl.dot would use TF32); bf16/fp16 ignore this
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, bn))](
        x, gate_up, h, blocks.pair_ids, blocks.block_experts, num_pairs, top_k, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(num_blocks, triton.cdiv(hidden, bn))](
        h, down, out, blocks.pair_ids, blocks.block_experts, topk_weights.float().contiguous(), num_pairs, inter,
        hidden, h.stride(0), down.stride(0), down.stride(1), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)
