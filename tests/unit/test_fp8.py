"""FP8 (e4m3) KV quantization: the round-trip error bound, edge magnitudes, cache sizing
and the kv_cache_dtype configuration."""
import pytest
import torch

from nanovllm.config import Config
from nanovllm.engine.kv_cache import KVCachePool, block_bytes, kv_cache_dtype
from nanovllm.kernels.fp8 import FP8_DTYPE, FP8_MAX, SCALE_DTYPE, dequantize_fp8, quantize_fp8
from nanovllm.layers.backends import resolve_backend

E4M3_REL = 2.0 ** -4  # 3 mantissa bits, round to nearest: at most half an ulp, 2^-4 of the value
E4M3_SUBNORMAL_STEP = 2.0 ** -9  # below 2^-6 e4m3 steps by 2^-9 (in units of the scale)


def assert_round_trip_bound(x: torch.Tensor) -> None:
    q, scale = quantize_fp8(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == SCALE_DTYPE and scale.shape == x.shape[:-1]
    y = dequantize_fp8(q, scale)
    err = (y - x.float()).abs()
    amax = x.float().abs().amax(-1, keepdim=True)
    assert torch.isfinite(y).all()
    # per element: half an ulp of e4m3 (relative) or half the subnormal step (absolute)
    assert (err <= E4M3_REL * x.float().abs() + E4M3_SUBNORMAL_STEP / 2 * scale[..., None]).all()
    # per row: within 2^-4 of the row's amax, and the amax itself maps to 448 exactly
    assert (err <= E4M3_REL * amax).all()
    rows = amax[..., 0] > 0
    assert (q.float().abs().amax(-1)[rows] == FP8_MAX).all()


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1.0, 1e4, 1e30])
def test_round_trip_error_is_within_e4m3_bound(magnitude):
    torch.manual_seed(0)
    x = torch.randn(64, 4, 128) * magnitude  # [tokens, kv heads, head_dim]
    assert_round_trip_bound(x)
    # the bound is tight: normal values really are rounded to 3 bits, not a finer format
    q, scale = quantize_fp8(x)
    normal = q.float().abs() >= 2.0 ** -6
    rel = ((dequantize_fp8(q, scale) - x) / x).abs()[normal]
    assert E4M3_REL / 2 < rel.max() <= E4M3_REL


def test_rows_of_mixed_magnitudes_are_scaled_independently():
    torch.manual_seed(1)
    x = torch.randn(8, 2, 64) * torch.logspace(-20, 20, 8)[:, None, None]
    assert_round_trip_bound(x)
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 1000  # bf16 input, one outlier per row
    x[:, 5] = 3e4
    assert_round_trip_bound(x)


def test_zero_rows_give_zeros_and_finite_scales():
    x = torch.randn(4, 3, 16)
    x[1] = 0.0
    x[2, 1] = 0.0
    q, scale = quantize_fp8(x)
    y = dequantize_fp8(q, scale)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert (y[1] == 0).all() and (y[2, 1] == 0).all()
    assert_round_trip_bound(x)


def test_exact_e4m3_values_round_trip_exactly():
    # every finite non-negative e4m3 value times 2^k, in a row whose amax is 448 * 2^k
    values = torch.arange(127, dtype=torch.uint8).view(FP8_DTYPE).float()
    for k in (-40, 0, 40):
        x = torch.cat([values, values.neg()]) * 2.0 ** k
        q, scale = quantize_fp8(x)
        assert scale.item() == 2.0 ** k
        assert torch.equal(dequantize_fp8(q, scale), x)


# ----------------------------------------------------------------------------- sizing
@pytest.mark.parametrize("model_dtype,head_dim", [(torch.bfloat16, 128), (torch.float32, 16), (torch.float16, 64)])
def test_fp8_block_bytes_count_scales(model_dtype, head_dim):
    layers, block_size, heads = 3, 16, 2
    fp8 = block_bytes(layers, block_size, heads, head_dim, kv_cache_dtype("fp8", model_dtype))
    full = block_bytes(layers, block_size, heads, head_dim, kv_cache_dtype("auto", model_dtype))
    assert full == 2 * layers * block_size * heads * head_dim * model_dtype.itemsize
    # one e4m3 byte per element, plus a float32 scale per (token, kv head) for K and for V
    assert fp8 == 2 * layers * block_size * heads * (head_dim + 4)
    pool = KVCachePool(layers, 5, block_size, heads, head_dim, FP8_DTYPE, torch.device("cpu"))
    allocated = pool.cache.numel() * pool.cache.element_size() + pool.scales.numel() * pool.scales.element_size()
    assert allocated == 5 * fp8


def test_auto_kv_cache_dtype_is_the_model_dtype_and_has_no_scales():
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    pool = KVCachePool(2, 4, 16, 2, 8, torch.bfloat16, torch.device("cpu"))
    assert pool.scales is None


# ----------------------------------------------------------------------------- config
def test_kv_cache_dtype_validation(tmp_path):
    assert Config(str(tmp_path)).kv_cache_dtype == "auto"
    assert Config(str(tmp_path), kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    for bad in ("int4", "float8", "bfloat16", None, 8):
        with pytest.raises(ValueError) as info:
            Config(str(tmp_path), kv_cache_dtype=bad)
        assert "kv_cache_dtype" in str(info.value) and repr(bad) in str(info.value) and "'fp8'" in str(info.value)


def test_flash_backend_refuses_fp8(tmp_path):
    with pytest.raises(ValueError, match="attention_backend 'flash'.*fp8"):
        Config(str(tmp_path), attention_backend="flash", kv_cache_dtype="fp8")
    # resolve_backend checks it first, whatever the device (this machine may have no CUDA)
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="attention_backend 'flash'.*fp8"):
            resolve_backend("flash", torch.device(device), 256, torch.bfloat16, "fp8")


def test_auto_backend_with_fp8(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu"), 16, torch.float32, "fp8") == "torch"
    # on CUDA auto would pick flash for bf16 + block 256; fp8 needs our triton kernels instead
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert resolve_backend("auto", torch.device("cuda"), 256, torch.bfloat16, "fp8") == "triton"
    # before Ada (8.9) Triton has no e4m3 type: refused up front, not a compile error mid-run
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    for name in ("auto", "triton"):
        with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'.*compute capability >= 8.9"):
            resolve_backend(name, torch.device("cuda"), 256, torch.bfloat16, "fp8")
    assert resolve_backend("triton", torch.device("cuda"), 256, torch.bfloat16, "auto") == "triton"
