"""Compile every Triton kernel launch the engine makes for an H100/H200 (sm_90), on a machine
without a GPU: `python tests/kernels/sm90_launches.py` (run by test_kernels_compile.py).

The kernel wrappers run on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and a
device, no data), so each chooses its launch exactly as on a GPU (tiles, warps, stages; no
interpreter-only UPCAST). Every launch is caught before it reaches a driver and compiled with
Triton's own ptxas instead, and must fit an SM's shared memory; a failure ends the run with its
traceback, as does a kernel in nanovllm.kernels that no case launches.

The cases mirror what the layers pass: the shapes of Qwen3-0.6B, Qwen3-30B-A3B and SmolLM2-135M,
bf16 and fp8 KV caches, decode with and without key splits and shared-prefix units, prefill from
the cache and the warmup's uncached form, every skinny-GEMM table entry, every MoE tile bucket,
and the sampler's settings on bf16 logits and on the float32 copy penalties make. Of the ~160
distinct launches, a few that together bring every constexpr value, argument type and launch
option seen are compiled (~50: every flag and tile size at least once);
NANOVLLM_COMPILE_ALL=1 compiles them all (~90 s on 2 cores).
"""
import itertools
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

POINTEE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}
TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 232_448   # bytes an sm_90 block may use (227 KiB)
launches: dict[tuple, tuple] = {}   # one entry per distinct (kernel, signature, constexprs, options)
# run as a script its folder leads sys.path: the package comes from PYTHONPATH or an install, else
# from this checkout (a GPU machine that runs the tests from a copy has no install)
sys.path.append(str(Path(__file__).resolve().parents[2]))


def record(kernel: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stands in for JITFunction.run: the launch's argument types and constexprs, kept to compile."""
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    bound = kernel.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound.arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTEE[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    key = (kernel.__name__, tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(options.items())))
    launches.setdefault(key, (kernel, signature, constexprs, options))


def cuda(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


class Model(NamedTuple):
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool


MODELS = (Model(1024, 3072, 16, 8, 128, True),    # Qwen3-0.6B
          Model(2048, 768, 32, 4, 128, True),     # Qwen3-30B-A3B (intermediate: an expert's)
          Model(576, 1536, 9, 3, 64, False))      # SmolLM2-135M, the demo model (Llama: no q/k-norm)


def layer_kernels(m: Model) -> None:
    from nanovllm.kernels import activation, kv_store, paged_decode, paged_prefill, rmsnorm, rotary
    from nanovllm.kernels.fp8 import FP8_DTYPE, SCALE_DTYPE
    from nanovllm.utils.context import decode_unit_size
    for residual in (False, True):
        rmsnorm.rmsnorm(cuda(256, m.hidden), cuda(m.hidden), 1e-6, cuda(256, m.hidden) if residual else None)
    activation.silu_and_mul(cuda(256, 2 * m.intermediate))
    block_size, num_blocks, num_seqs = 256, 64, 64
    cos_sin = tuple(cuda(4096, m.head_dim // 2, dtype=torch.float32) for _ in "cs")
    norms = (cuda(m.head_dim), cuda(m.head_dim)) if m.qk_norm else (None, None)
    lens, tables = cuda(num_seqs, dtype=torch.int32), cuda(num_seqs, num_blocks, dtype=torch.int32)
    cu_seqlens = cuda(num_seqs + 1, dtype=torch.int32)
    for kv_dtype in (torch.bfloat16, FP8_DTYPE):
        k_cache, v_cache = (cuda(num_blocks, block_size, m.num_kv_heads, m.head_dim, dtype=kv_dtype) for _ in "kv")
        scales = dict(k_scale=None, v_scale=None)
        if kv_dtype == FP8_DTYPE:
            scales = {name: cuda(num_blocks, block_size, m.num_kv_heads, dtype=SCALE_DTYPE) for name in scales}
        for tokens in (1, 512):   # decode's one-token tiles, prefill's 16-token ones
            q, k, v = (cuda(tokens, heads, m.head_dim) for heads in (m.num_heads, m.num_kv_heads, m.num_kv_heads))
            slots = cuda(tokens, dtype=torch.int64)
            kv_store.store_kv(k, v, k_cache, v_cache, slots, **scales)
            if kv_dtype == torch.bfloat16:   # the fused K/V store writes k's dtype only
                for store in (None, (v, k_cache, v_cache, slots)):
                    rotary.qk_norm_rope(q, k, slots, *cos_sin, *norms, 1e-6, store=store)
        units = decode_unit_size(m.num_heads, m.num_kv_heads)
        for splits, unit_size in itertools.product((1, 4), (0, units)):
            grouping = {} if not unit_size else dict(units=cuda(num_seqs, unit_size, dtype=torch.int32),
                                                     shared_lens=cuda(num_seqs, dtype=torch.int32))
            paged_decode.paged_decode_attention(cuda(num_seqs, m.num_heads, m.head_dim), k_cache, v_cache, lens,
                                                tables, 0.088, num_splits=splits, **scales, **grouping)
        q = cuda(2048, m.num_heads, m.head_dim)
        paged_prefill.paged_prefill_attention(q, k_cache, v_cache, cu_seqlens, lens, tables, 1024, 0.088, **scales)
    k = cuda(2048, 1, m.num_kv_heads, m.head_dim)   # the warmup's uncached prefill: one-token pages
    paged_prefill.paged_prefill_attention(q, k, k, cu_seqlens, lens, tables, 1024, 0.088)


def skinny_kernels() -> None:
    from nanovllm.kernels import skinny_gemm
    for (n, k), gated in itertools.product(skinny_gemm.SKINNY_CONFIGS, (False, True)):
        skinny_gemm.skinny_linear(cuda(1, 2 * k if gated else k), cuda(n, k), gated=gated)
    skinny_gemm.skinny_linear(cuda(1, 576), cuda(1000, 576), cuda(1000))   # off the table, with a bias
    skinny_gemm.skinny_linear(cuda(1, 1024), cuda(1024, 1024), config=skinny_gemm.SkinnyConfig(8, 256, 4, 3, 4))


def moe_kernels() -> None:
    from nanovllm.kernels import fused_moe
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768   # Qwen3-30B-A3B
    gate_up, down = cuda(num_experts, 2 * inter, hidden), cuda(num_experts, hidden, inter)
    for limit, _, _ in fused_moe.TILE_TABLE:
        tokens = min(limit, 4096)
        router = cuda(tokens, num_experts)
        for slots in (None, cuda(tokens, dtype=torch.int64)):
            weights, ids = fused_moe.topk_softmax(router, top_k, True, slots)
        fused_moe.fused_experts(cuda(tokens, hidden), gate_up, down, weights, ids)


def sampling_kernels() -> None:
    from nanovllm.kernels.sampling import draw_tokens
    from nanovllm.kernels.sampling_thresholds import sampling_thresholds
    rows, vocab = 256, 151_936
    temps, keys = cuda(rows, dtype=torch.float32), cuda(rows, dtype=torch.int64)
    top_k, top_p, min_p = cuda(rows, dtype=torch.int64), cuda(rows, dtype=torch.float32), cuda(rows, dtype=torch.float32)
    for dtype, masked in itertools.product((torch.bfloat16, torch.float32), (False, True)):   # float32: penalties' copy
        logits = cuda(rows, vocab, dtype=dtype)
        mask = {} if not masked else dict(bitmask=cuda(rows, triton.cdiv(vocab, 32), dtype=torch.int32),
                                          mask_rows=cuda(rows, dtype=torch.int32))
        for k, p, m in itertools.product((None, top_k), (None, top_p), (None, min_p)):
            if k is None and p is None and m is None:
                continue
            draw_tokens(logits, temps, keys, thresholds=sampling_thresholds(logits, temps, k, p, m, **mask), **mask)
        draw_tokens(logits, temps, keys, **mask)


def every_kernel() -> list[str]:
    """The name of every launchable kernel (a module-level `@triton.jit` *_kernel) in nanovllm.kernels."""
    import importlib
    import pkgutil
    import nanovllm.kernels
    names = []
    for module in pkgutil.iter_modules(nanovllm.kernels.__path__):
        contents = vars(importlib.import_module(f"nanovllm.kernels.{module.name}"))
        names += [name for name, obj in contents.items() if isinstance(obj, JITFunction) and name.endswith("_kernel")]
    return names


def covering(keys: list[tuple]) -> list[tuple]:
    """Few launches that together bring every value seen: of each constexpr, of each argument's
    type and of each launch option (every flag and tile size compiles at least once). Greedy set
    cover, the launch that brings the most values not yet chosen first: ~50 of ~160 launches
    (taking them in order, each that brings anything new, chose ~80)."""
    facts = {}
    for key in keys:
        kernel, signature, constexprs, options = launches[key]
        facts[key] = {(kernel.__name__, name, kind) for name, kind in signature.items()}
        facts[key] |= {(kernel.__name__, name, repr(value)) for name, value in (constexprs | options).items()}
    left, chosen = set().union(*facts.values()), []
    while left:
        key = max(keys, key=lambda k: len(facts[k] & left))
        chosen.append(key)
        left -= facts[key]
    return chosen


def compile_launch(key: tuple) -> None:
    kernel, signature, constexprs, options = launches[key]
    shared = triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options=options).metadata.shared
    if shared > SHARED_MEMORY:
        raise RuntimeError(f"{kernel.__name__} {constexprs} {options} needs {shared} bytes of shared memory")


def main() -> int:
    JITFunction.run = record
    with FakeTensorMode():
        for model in MODELS:
            layer_kernels(model)
        skinny_kernels()
        moe_kernels()
        sampling_kernels()
    start = time.perf_counter()
    workers = min(8, len(os.sched_getaffinity(0)))
    keys = list(launches) if os.environ.get("NANOVLLM_COMPILE_ALL") == "1" else covering(list(launches))
    with multiprocessing.get_context("fork").Pool(workers) as pool:   # forked workers see `launches`
        pool.map(compile_launch, keys, chunksize=1)
    names = sorted({kernel.__name__ for kernel, *_ in launches.values()})
    missing = sorted(set(every_kernel()) - set(names))
    if missing:
        print("never launched here (add its cases):", " ".join(missing), file=sys.stderr)
        return 1
    print(f"compiled {len(keys)} of {len(launches)} distinct launches of {len(names)} kernels in {time.perf_counter() - start:.1f} s:",
          " ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
