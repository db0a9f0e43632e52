"""Scatter one step's K/V rows into the paged KV cache (Triton).

k, v:          [num_tokens, num_kv_heads, head_dim] (may be strided views of a fused qkv)
k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
k_scale/v_scale: [num_blocks, block_size, num_kv_heads] float32, fp8 caches only
slot_mapping:  [num_tokens] int64, flat slot block_id * block_size + offset; -1 = skip

An fp8 (e4m3) cache is written quantized with one dynamic scale per token and KV head,
bit for bit what `nanovllm.kernels.fp8.quantize_fp8` computes.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_common import rows_contiguous
from nanovllm.kernels.fp8 import FP8_MAX, MIN_SCALE, is_fp8, scale_strides

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
_E4M3_MIN_NORMAL_EXP = tl.constexpr(127 - 6)  # biased float32 exponent of 2^-6, e4m3's smallest normal


@triton.jit
def _to_e4m3(x):
    """float32 x (|x| <= 448) -> e4m3, rounded to nearest-even, bit for bit torch's cast.

    |x| is rounded on the e4m3 grid in float32 (so the cast itself is exact: Triton's CPU
    interpreter rounds fp8 casts wrongly when the mantissa carries, 1.9375 -> 1.0), and the
    sign goes on as a bit (a float select of -0.0 is not kept on the H100, where -0.0004
    would become +0 instead of torch's -0).
    """
    a = tl.abs(x)
    # e4m3 steps by 2^(e-3) in the binade [2^e, 2^(e+1)) from 2^-6 up, and by 2^-9 below
    exp_bits = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, _E4M3_MIN_NORMAL_EXP)  # biased e
    # a float32 2^(e+20) has ulp 2^(e-3): adding it rounds a to the grid (round-to-nearest-even)
    magic = ((exp_bits + 20) << 23).to(tl.float32, bitcast=True)
    bits = ((a + magic) - magic).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    sign = tl.where(x.to(tl.int32, bitcast=True) < 0, 0x80, 0).to(tl.uint8)
    return (bits | sign).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _quantize_rows(x):
    """[BLOCK_H, BLOCK_D] rows -> (e4m3 rows, [BLOCK_H] float32 scales), as quantize_fp8."""
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # masked lanes were loaded as 0
    # NOTE: IEEE divisions (div_rn), so the scales and rounding match torch's bit for bit
    scale = tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _MIN_SCALE)
    q = tl.math.div_rn(x, scale[:, None])
    q = tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)
    return _to_e4m3(q), scale


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_sb, stride_ss,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # NOTE: slot -1 is never written (CUDA-graph padding rows)
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]

    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch
    if FP8:
        k = tl.where(mask, k, 0.0)  # padded lanes must not raise the row's amax
        v = tl.where(mask, v, 0.0)
        k, k_scale = _quantize_rows(k)
        v, v_scale = _quantize_rows(v)
        h_mask = offs_h < NUM_KV_HEADS
        scale_row = block * stride_sb + offset * stride_ss + offs_h  # [BLOCK_H]
        tl.store(k_scale_ptr + scale_row, k_scale, mask=h_mask)
        tl.store(v_scale_ptr + scale_row, v_scale, mask=h_mask)
    tl.store(k_dst + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write k[i], v[i] to cache slot slot_mapping[i]; slot -1 writes nothing.

    An fp8 cache also needs k_scale/v_scale, which receive each row's dequantization scale.
    One program per token, no host syncs: safe inside CUDA-graph capture.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "KV cache rows must be contiguous"
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape[0] == num_tokens
    stride_sb, stride_ss = scale_strides(k_cache, k_scale, v_scale)
    k, v = rows_contiguous(k), rows_contiguous(v)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sb, stride_ss,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=is_fp8(k_cache.dtype), num_warps=4,
    )

