"""Pieces shared by the paged prefill and paged decode kernels: head-dim masks, paged row
addressing, the interpreter-safe dot, the online-softmax update and the launch helpers.

Scores are kept in the log2 domain (scale * LOG2E), so exp2 replaces exp.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_D] head_dim mask; a constant when head_dim is already a power of two."""
    if HEAD_DIM == BLOCK_D:
        mask = tl.full([BLOCK_D], 1, tl.int1)
    else:
        mask = offs_d < HEAD_DIM
    return mask


@triton.jit
def paged_rows(block_table_ptr, start_n, offs_n, key_mask, stride_block, stride_slot,
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
def tile_dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # NOTE: Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits;
        # in float32 the products of bf16 (or fp16) values are exact, so nothing changes.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def online_softmax(qk, v, v_scale, acc, m_i, l_i, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   FP8: tl.constexpr):
    """Fold one key tile into the running (acc, max, sum); qk [M, N] is log2-scaled, -inf masked.

    FP8: v holds the tile's e4m3 values (already widened) and v_scale [N] their per-key
    scales, folded into the weights p rather than into v (M x N multiplies, not N x D).
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [M]
    # NOTE: a row with every key masked so far keeps m = -inf; exponentiate against 0
    # instead so it contributes exact zeros rather than NaN (inf - inf).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP8:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def load_scales(ks_base, vs_base, bt_ptr, start_n, offs_n, key_mask, stride_sb, stride_ss,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """An fp8 tile's [BLOCK_N] K and V scales; masked keys get 0."""
    # NOTE: K's and V's scales share strides, so one row lookup serves both
    rows = paged_rows(bt_ptr, start_n, offs_n, key_mask, stride_sb, stride_ss, BLOCK_SIZE, BLOCK_N)
    k_scale = tl.load(ks_base + rows, mask=key_mask, other=0.0)
    v_scale = tl.load(vs_base + rows, mask=key_mask, other=0.0)
    return k_scale, v_scale


class KernelConfig(NamedTuple):
    block_m: int  # prefill rows (queries x group heads) per program; decode: unused
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact IEEE dots (the reference is float32); others use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()
