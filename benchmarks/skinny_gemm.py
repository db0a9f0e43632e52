"""The skinny GEMM kernel against torch's GEMM (cuBLAS) on Qwen3-0.6B's projections at
decode batches of 1-8 rows: time per call (CUDA-graph replays), achieved TB/s of weight
reads, and the error against a float32 product.

    python benchmarks/skinny_gemm.py
"""
import torch
import torch.nn.functional as F

from nanovllm.kernels.skinny_gemm import skinny_linear

SHAPES = {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
REPLAYS = 200


def replay_ms(fn) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPLAYS / 20


def main() -> None:
    print(f"{'proj':8s} {'rows':>4s} {'cuBLAS us':>10s} {'skinny us':>10s} {'skinny TB/s':>11s} {'rel err':>8s}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            exact = x.float() @ w.float().T
            err = ((skinny_linear(x, w).float() - exact).norm() / exact.norm()).item()
            t_ref = replay_ms(lambda: F.linear(x, w)) * 1000
            t_new = replay_ms(lambda: skinny_linear(x, w)) * 1000
            print(f"{name:8s} {rows:4d} {t_ref:10.2f} {t_new:10.2f} {n * k * 2 / t_new / 1e6:11.2f} {err:8.1e}")


if __name__ == "__main__":
    main()
