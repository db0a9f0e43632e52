"""y = x W^T (+ b) for one row of x: the projections of a batch-1 decode step.

At batch 1 a projection is a matrix-vector product bound by reading W once, but cuBLAS
picks tiles of 8-64 rows and reached 0.3-2.6 TB/s on Qwen3-0.6B's projections on the H200
(`benchmarks/skinny_gemm.py`, 2026-12-02). Here each program reads a BLOCK_N x K stripe of
W exactly once, in BLOCK_K chunks, with the row's partial sums in registers. From 2 rows
on, cuBLAS was as fast or faster on most shapes, so only single rows come here.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                        M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    for m in tl.static_range(M):
        acc2d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over k once, at the end
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            # NOTE: W is re-read for each row m, but from L2: only the first row's pass goes to DRAM
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0)
            acc2d += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(acc2d, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any M; faster than cuBLAS at M = 1), weight [N, K] (rows contiguous) -> [M, N] in x's dtype."""
    x = x if x.stride(1) == 1 else x.contiguous()
    num_rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if num_rows:
        block_n = 8 if n <= 2048 else 16  # >= 128 programs on the narrow projections (as measured)
        _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
            x, weight, bias if bias is not None else weight, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
            M=num_rows, BLOCK_N=block_n, BLOCK_K=256, HAS_BIAS=bias is not None, num_warps=4)
    return y
