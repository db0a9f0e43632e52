"""y = x W^T (+ b) for one row of x: the projections of a batch-1 decode step.

At batch 1 a projection is a matrix-vector product bound by reading W once, but cuBLAS
picks tiles of 8-64 rows and reached 0.3-2.6 TB/s on Qwen3-0.6B's projections on the H200
(`benchmarks/skinny_gemm.py`, 2026-12-02). Here each program reads a BLOCK_N x K stripe of
W exactly once, in BLOCK_K chunks, with the row's partial sums in registers. From 2 rows
on, cuBLAS was as fast or faster on most shapes, so only single rows come here.

Reading W at full bandwidth needs enough bytes in flight on every SM. A narrow W (N = 1024)
gives few row stripes, so SPLIT_K cuts K into parts run by separate programs too. The tile
and launch parameters are chosen per (N, K) from SKINNY_CONFIGS, filled from
`python benchmarks/skinny_gemm.py --sweep` (which times W cold in L2, as the model reads it).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanovllm.kernels.activation import silu_mul


class SkinnyConfig(NamedTuple):
    block_n: int  # rows of W (outputs) per program
    block_k: int  # columns of W per loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the W loads
    split_k: int = 1  # programs along K; > 1 writes fp32 partial sums that a second kernel adds


# (N, K) -> config, measured by `benchmarks/skinny_gemm.py --sweep` (it prints lines to paste here).
# Shapes not listed get `default_config`.
SKINNY_CONFIGS: dict[tuple[int, int], SkinnyConfig] = {
    # Qwen3-0.6B, one H100 80GB HBM3, 2026-12-05 (`--sweep --quick`; split-K won on no shape)
    (4096, 1024): SkinnyConfig(4, 512, 4, 1, 1),   # qkv: 4.48 us (1.87 TB/s), default 5.16, cuBLAS 5.28
    (1024, 2048): SkinnyConfig(4, 1024, 8, 3, 1),  # o_proj: 3.70 us (1.13 TB/s), default 6.10, cuBLAS 5.78
    (6144, 1024): SkinnyConfig(8, 512, 4, 1, 1),   # gate_up: 6.26 us (2.01 TB/s), default 6.58, cuBLAS 6.99
    (1024, 3072): SkinnyConfig(4, 1024, 8, 1, 1),  # down: 4.60 us (1.37 TB/s), default 8.28, cuBLAS 6.91
}

REDUCE_BLOCK = 1024  # outputs per program of the split-K reduce


def default_config(n: int, k: int) -> SkinnyConfig:
    # the pre-sweep choice: >= 128 programs on the narrow projections (N = 1024 at BLOCK_N 8)
    return SkinnyConfig(block_n=8 if n <= 2048 else 16, block_k=256, num_warps=4, num_stages=3)


def skinny_config(n: int, k: int) -> SkinnyConfig:
    return SKINNY_CONFIGS.get((n, k)) or default_config(n, k)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, k_per_split, stride_xm, stride_wn, stride_os, stride_om,
                        M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    # program (n-block, split): out[split, m, n-block] = x[m, k-range] . W[n-block, k-range]
    # GATED: x[m] is [gate | up] (2K wide) and its k-th input is silu(gate[k]) * up[k]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)  # an empty range (k_start >= K) writes zeros
    out_ptr += tl.program_id(1) * stride_os
    for m in tl.static_range(M):
        acc2d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over k once, at the end
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
            # NOTE: W is re-read for each row m, but from L2: only the first row's pass goes to DRAM
            if EVEN_K:  # every chunk is whole: no k mask, so loads stay 16-byte vectors
                w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
                x = tl.load(x_ptr + m * stride_xm + offs_k)
                if GATED:
                    x = silu_mul(x, tl.load(x_ptr + m * stride_xm + K + offs_k), x_ptr.dtype.element_ty)
            else:
                k_mask = offs_k < k_end
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0)
                if GATED:
                    up = tl.load(x_ptr + m * stride_xm + K + offs_k, mask=k_mask, other=0.0)
                    x = silu_mul(x, up, x_ptr.dtype.element_ty)
            acc2d += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(acc2d, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _split_k_reduce_kernel(part_ptr, b_ptr, y_ptr, N, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                           HAS_BIAS: tl.constexpr):
    # y[m, n] = sum over splits of part[split, m, n] (+ b[n]), in split order
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + split * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] (any M; faster than cuBLAS at M = 1), weight [N, K] (rows contiguous) -> [M, N] in x's dtype.

    config: tiles and launch parameters (default: `skinny_config(N, K)`); the benchmark's sweep passes its own.
    gated: x is [M, 2K] = [gate | up] and the product's input silu(gate) * up (SwiGLU): the same
    bits as `silu_and_mul` then this, without that kernel's launch.
    """
    x = x if x.stride(1) == 1 else x.contiguous()
    num_rows, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n = weight.shape[0]
    y = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if not num_rows:
        return y
    cfg = config or skinny_config(n, k)
    num_chunks = triton.cdiv(k, cfg.block_k)
    split_k = max(1, min(cfg.split_k, num_chunks))
    k_per_split = triton.cdiv(num_chunks, split_k) * cfg.block_k  # whole chunks: only K's end can be ragged
    # Split-K partial sums are combined by a second kernel, not by fp32 atomics into y: atomics need
    # a zeroed buffer and a cast afterwards (three launches against two) and add in arrival order,
    # so the same input could round differently from run to run. Both stay CUDA-graph capturable.
    direct = split_k == 1
    out = y if direct else torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
    b = bias if bias is not None else weight  # a dummy pointer when there is no bias
    _skinny_gemm_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
        x, weight, b, out, n, k, k_per_split, x.stride(0), weight.stride(0), num_rows * n, n,
        M=num_rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        HAS_BIAS=direct and bias is not None, GATED=gated, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        _split_k_reduce_kernel[(triton.cdiv(num_rows * n, REDUCE_BLOCK),)](
            out, b, y, n, num_rows * n, SPLIT_K=split_k, BLOCK=REDUCE_BLOCK, HAS_BIAS=bias is not None, num_warps=4)
    return y
