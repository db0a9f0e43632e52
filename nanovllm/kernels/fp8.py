"""FP8 (e4m3) KV-cache quantization in plain PyTorch: the rule the Triton KV-store kernel
reproduces bit for bit, and what the torch reference backend and the tests use.

Dynamic scales, one per token and KV head, computed when the row is written:
  scale = max(amax(|row|) / FP8_MAX, MIN_SCALE),   q = round_e4m3(row / scale)
so every row's largest element maps to +-448 and each element keeps e4m3's 3-bit
mantissa whatever the row's magnitude; no calibration needed.

Scales are float32: an exact scale leaves e4m3's rounding the only error, and costs 4
bytes beside each head_dim-byte row (3% at head_dim 128). A bf16 scale would save half
of that but round the scale itself to 8 bits, and a rounded-down scale can push
|row / scale| past 448.

Only torch is imported here, so the CPU path never imports Triton.
"""
import torch

FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32
FP8_MAX = 448.0  # e4m3fn's largest finite value
# The smallest normal float32: keeps all-zero rows finite (q = 0 / MIN_SCALE = 0) and
# scales normal, so rows with amax down to ~5e-36 keep full e4m3 precision.
MIN_SCALE = torch.finfo(torch.float32).tiny


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (q [..., head_dim] float8_e4m3fn, scale [...] float32)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    # NOTE: divide by a tensor on the same device: PyTorch's CUDA division by a Python scalar
    # multiplies by its reciprocal, one bit off the IEEE quotient the Triton kernel computes
    scale = (amax / amax.new_full((), FP8_MAX)).clamp_min(MIN_SCALE)  # [...]
    # NOTE: clamp before the cast: e4m3fn has no inf, an out-of-range cast would be NaN
    q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [..., head_dim] e4m3, scale [...]) -> float32 [..., head_dim]."""
    return q.float() * scale[..., None]


def scale_strides(cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[int, int] | tuple[None, None]:
    """Launcher check: the (block, slot) strides of an fp8 cache's scales, or (None, None)
    for other caches, whose kernels then get None, a compile-time constant, for every
    scale argument (and so compile exactly as they would without scales).

    Scales are [num_blocks, block_size, num_kv_heads] float32 with heads contiguous, K and
    V alike: the kernels address both with one set of strides.
    """
    if not is_fp8(cache.dtype):
        assert k_scale is None and v_scale is None, "scales belong to fp8 caches only"
        return None, None
    assert k_scale is not None and v_scale is not None, "an fp8 KV cache needs k_scale and v_scale"
    for s in (k_scale, v_scale):
        assert s.dtype == SCALE_DTYPE and s.shape == cache.shape[:3] and s.stride(-1) == 1, s.shape
    assert k_scale.stride() == v_scale.stride()
    return k_scale.stride(0), k_scale.stride(1)
