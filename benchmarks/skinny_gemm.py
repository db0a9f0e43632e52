"""The skinny GEMM kernel against torch's GEMM (cuBLAS) on Qwen3-0.6B's projections.

    python benchmarks/skinny_gemm.py            # decode batches of 1-8 rows, default configs
    python benchmarks/skinny_gemm.py --sweep    # one row: time a grid of configs per shape
    python benchmarks/skinny_gemm.py --sweep --quick

The default mode replays one weight (it stays in L2): time per call (CUDA-graph replays),
achieved TB/s of weight reads, and the error against a float32 product.

--sweep times each config the way the model runs: one weight copy per layer (28, 0.2-0.35 GB
per shape, far past the H200's 50 MB L2) called in sequence inside one CUDA graph, time per
call = graph time / calls. It prints the best configs per shape and lines to paste into
`SKINNY_CONFIGS` in nanovllm/kernels/skinny_gemm.py.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package

from nanovllm.kernels.skinny_gemm import SkinnyConfig, default_config, skinny_linear  # noqa: E402

SHAPES = {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
REPLAYS = 200
LAYERS = 28  # Qwen3-0.6B: each layer reads its own weights, so a decode step finds none in L2
SWEEP_REPLAYS = 30
MAX_REL_ERR = 1e-2
NUM_SMS_H200 = 132


def graph_us(calls: list[Callable[[], object]], replays: int) -> float:
    """Mean µs per call of `calls` captured in sequence in one CUDA graph."""
    for call in calls:  # compile and warm up outside the capture
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / len(calls)


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.float() - exact).norm() / exact.norm()).item()


def tb_per_s(n: int, k: int, us: float) -> float:
    return n * k * 2 / us / 1e6  # bf16 weight bytes / time


def batch_table() -> None:
    print(f"{'proj':8s} {'rows':>4s} {'cuBLAS us':>10s} {'skinny us':>10s} {'skinny TB/s':>11s} {'rel err':>8s}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            err = rel_err(skinny_linear(x, w), x.float() @ w.float().T)
            t_ref = graph_us([lambda: F.linear(x, w)] * 20, REPLAYS)
            t_new = graph_us([lambda: skinny_linear(x, w)] * 20, REPLAYS)
            print(f"{name:8s} {rows:4d} {t_ref:10.2f} {t_new:10.2f} {tb_per_s(n, k, t_new):11.2f} {err:8.1e}")


def sweep_configs(n: int, k: int, quick: bool) -> list[SkinnyConfig]:
    """The pruned grid for one shape, ~30-50 configs. Tiles keep 16 or 32 fp32 accumulators per
    thread (fewer: loads narrower than 16 bytes or too little in flight; more: spills once
    pipelined). A config must give at least one program per SM. SPLIT_K only where N alone gives
    under two programs per SM, with whole chunks per split, at stages 1 and 3. Nothing here but
    the split depends on (N, K), so one compile serves all four shapes: ~50 compiles in all."""
    tiles = [(4, 256, 2), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 8),
             (32, 256, 8)]
    stages = (1, 2, 3, 4)
    if quick:  # ~25 compiles
        tiles, stages = tiles[1:6], (1, 3)
    configs = []
    for block_n, block_k, warps in tiles:
        programs = -(-n // block_n)
        for split_k in (1, 2, 4):
            if split_k > 1 and (programs >= 2 * NUM_SMS_H200 or k // split_k < block_k):
                continue
            if programs * split_k < NUM_SMS_H200:
                continue
            for num_stages in stages if split_k == 1 else (1, 3):
                if num_stages > 1 and k // (split_k * block_k) < 2:
                    continue  # a single-step loop has nothing to pipeline
                configs.append(SkinnyConfig(block_n, block_k, warps, num_stages, split_k))
    return configs


class Timing(NamedTuple):
    us: float
    config: SkinnyConfig


def time_config(cfg: SkinnyConfig, x: torch.Tensor, weights: list[torch.Tensor], exact: torch.Tensor) -> float:
    """µs per call over the rotated weights; raises ValueError if the result is wrong."""
    err = rel_err(skinny_linear(x, weights[0], config=cfg), exact)
    if not err < MAX_REL_ERR:
        raise ValueError(f"rel err {err:.1e}")
    return graph_us([lambda w=w: skinny_linear(x, w, config=cfg) for w in weights], SWEEP_REPLAYS)


def sweep_shape(name: str, n: int, k: int, quick: bool, top: int) -> str:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ weights[0].float().T
    cublas = graph_us([lambda w=w: F.linear(x, w) for w in weights], SWEEP_REPLAYS)
    default = time_config(default_config(n, k), x, weights, exact)
    timings, failed = [], []
    for cfg in sweep_configs(n, k, quick):
        try:
            timings.append(Timing(time_config(cfg, x, weights, exact), cfg))
        except Exception as e:  # OutOfResources, CompilationError, a wrong result: skip, but say so
            failed.append(f"{tuple(cfg)}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    timings.sort()
    print(f"\n{name} N={n} K={k} ({n * k * 2 / 1e6:.1f} MB, {LAYERS} rotated copies): "
          f"cuBLAS {cublas:.2f} us ({tb_per_s(n, k, cublas):.2f} TB/s), "
          f"default {tuple(default_config(n, k))} {default:.2f} us ({tb_per_s(n, k, default):.2f} TB/s), "
          f"{len(timings)} configs timed, {len(failed)} skipped")
    print(f"  {'block_n':>7s} {'block_k':>7s} {'warps':>5s} {'stages':>6s} {'split_k':>7s} {'us':>6s} {'TB/s':>5s}")
    for t in timings[:top]:
        print(f"  {t.config.block_n:7d} {t.config.block_k:7d} {t.config.num_warps:5d} {t.config.num_stages:6d} "
              f"{t.config.split_k:7d} {t.us:6.2f} {tb_per_s(n, k, t.us):5.2f}")
    for line in failed:
        print(f"  skipped {line}")
    del weights
    torch.cuda.empty_cache()
    if not timings:
        return f"    # {name} ({n}, {k}): no config ran"
    best = timings[0]
    return (f"    ({n}, {k}): SkinnyConfig{tuple(best.config)},  # {name}: {best.us:.2f} us "
            f"({tb_per_s(n, k, best.us):.2f} TB/s), default {default:.2f}, cuBLAS {cublas:.2f}")


def sweep(quick: bool, top: int) -> None:
    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, 1 row, "
          f"{LAYERS} weight copies per shape in one CUDA graph x {SWEEP_REPLAYS} replays")
    lines = [sweep_shape(name, n, k, quick, top) for name, (n, k) in SHAPES.items()]
    print("\nPaste into SKINNY_CONFIGS in nanovllm/kernels/skinny_gemm.py "
          "(SkinnyConfig(block_n, block_k, num_warps, num_stages, split_k)):")
    print("\n".join(lines))
    print(f"\nsweep took {time.perf_counter() - start:.0f} s (compiles included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time a grid of configs per shape, weights cold in L2")
    parser.add_argument("--quick", action="store_true", help="with --sweep: a smaller grid (5 tiles, stages 1 and 3)")
    parser.add_argument("--top", type=int, default=5, help="with --sweep: configs listed per shape")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.quick, args.top)
    else:
        batch_table()


if __name__ == "__main__":
    main()
