"""Time the fused MoE layer (router + top-k + Triton experts) at Qwen3-30B-A3B's shapes.

hidden 2048, 128 experts, top-8, moe_intermediate 768, bf16, one GPU. Decode reads the
weights of every expert some token picked, so the bound is bytes touched / bandwidth:
  touched  = distinct experts routed to x 3 x 768 x 2048 x 2 B (+ the router)
  TB/s     = touched / time;  x bound = time / (touched / 4.3 TB/s), the H200's sustained read
Prefill-sized batches are bound by compute instead: TFLOP/s counts 6 * pairs * hidden * inter.
`--layers` MoE layers with their own weights run back to back in one CUDA graph (as in the
model: each layer's weights come from HBM, not L2), timed by replay (median of `--reps`).
Before timing, the kernels are checked against the torch reference at every batch size on
random routing and on crafted loads (all tokens on one expert; 8 experts busy, 120 empty).

Usage (GPU machine, < 2 min): python benchmarks/fused_moe.py [--batches 1 16 64 256 512 4096]
  --sweep: also time a few other tile configs per batch size (adds ~1 min) and print the best.
  --sweep-down: also time other tiles for the down GEMM alone (block_m stays the table's).
  --padding: also time each batch as a decode CUDA graph runs it, padded to the next captured
    size, with the padding rows routed as their stale tokens pick and routed nowhere (the engine).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package

from nanovllm.engine.cuda_graph import graph_batch_sizes  # noqa: E402
from nanovllm.kernels.fused_moe import MoeTiles, fused_experts, tiles_for  # noqa: E402
from nanovllm.layers.fused_moe import FusedMoE, Routing, fused_experts_reference, select_experts  # noqa: E402

H200_TBPS = 4.3
SWEEP = [MoeTiles(16, 32, 128, 4, 4), MoeTiles(16, 64, 128, 4, 3), MoeTiles(16, 128, 128, 4, 3),
         MoeTiles(32, 64, 128, 4, 3), MoeTiles(32, 128, 64, 4, 3), MoeTiles(64, 64, 128, 4, 3),
         MoeTiles(64, 128, 64, 8, 3), MoeTiles(64, 128, 128, 8, 3),
         MoeTiles(16, 64, 128, 4, 4), MoeTiles(32, 64, 128, 4, 4), MoeTiles(16, 64, 256, 4, 3),
         MoeTiles(32, 64, 256, 4, 3), MoeTiles(32, 32, 128, 4, 4),
         # prefill sizes (thousands of tokens: compute bound)
         MoeTiles(128, 128, 64, 8, 3), MoeTiles(128, 128, 64, 8, 4), MoeTiles(128, 64, 64, 4, 4),
         MoeTiles(64, 128, 64, 4, 4), MoeTiles(128, 256, 64, 8, 3)]
# the down GEMM alone (N = hidden, K = moe_intermediate): block_m stays the table's
DOWN_SWEEP = [MoeTiles(0, 64, 128, 4, 3), MoeTiles(0, 128, 128, 4, 3), MoeTiles(0, 128, 64, 4, 4),
              MoeTiles(0, 64, 256, 4, 2), MoeTiles(0, 128, 256, 4, 2), MoeTiles(0, 256, 64, 8, 3),
              MoeTiles(0, 64, 64, 4, 4), MoeTiles(0, 32, 128, 4, 4), MoeTiles(0, 128, 128, 8, 3),
              MoeTiles(0, 256, 128, 8, 2)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256, 512, 4096])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--inter", type=int, default=768, help="moe_intermediate_size")
    p.add_argument("--layers", type=int, default=8, help="layers per graph (distinct weights: no L2 reuse)")
    p.add_argument("--reps", type=int, default=30, help="graph replays timed per row")
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP tile configs")
    p.add_argument("--sweep-down", action="store_true",
                   help="also time the DOWN_SWEEP tiles for the down GEMM (gate/up keeping the table's)")
    p.add_argument("--padding", action="store_true",
                   help="also time each batch padded to its decode-graph size, padding routed or not")
    return p.parse_args(argv)


class Layer(torch.nn.Module):
    """The MoE block of one decoder layer at TP=1: router, then the experts."""

    def __init__(self, args):
        super().__init__()
        self.gate = torch.nn.Linear(args.hidden, args.experts, bias=False)
        self.experts = FusedMoE(args.experts, args.top_k, args.hidden, args.inter, renormalize=True)
        for p in self.parameters():  # std 0.02 (HF's init): router logits ~N(0, 0.8), a realistic spread
            p.data.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor, tiles: MoeTiles | None = None, down: MoeTiles | None = None,
                slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        routing = select_experts(self.gate(x), self.experts.top_k, renormalize=True, slot_mapping=slot_mapping)
        return fused_experts(x, self.experts.gate_up_proj, self.experts.down_proj, routing.weights, routing.ids,
                             tiles, down)

    def touched_bytes(self, x: torch.Tensor) -> int:
        ids = select_experts(self.gate(x), self.experts.top_k, renormalize=True).ids
        per_expert = (self.experts.gate_up_proj[0].numel() + self.experts.down_proj[0].numel()) * x.element_size()
        return ids.unique().numel() * per_expert + self.gate.weight.numel() * x.element_size()


def crafted_routing(num_tokens: int, args, load: str) -> Routing:
    if load == "all-on-one-expert":  # every token's top-k: expert 3 and 7 others (random)
        rest = torch.rand(num_tokens, args.experts, device="cuda").argsort(-1)
        rest = rest[rest != 3].view(num_tokens, -1)[:, :args.top_k - 1]
        ids = torch.cat([torch.full((num_tokens, 1), 3, device="cuda"), rest], 1)
    else:  # "few-experts-rest-empty": experts 0..top_k-1 for every token
        ids = torch.arange(args.top_k, device="cuda").expand(num_tokens, -1)
    weights = torch.rand(num_tokens, args.top_k, device="cuda") + 0.1
    return Routing(weights / weights.sum(-1, keepdim=True), ids.to(torch.int32))


def check(layer: Layer, num_tokens: int, args) -> float:
    """Max |kernel - reference| / max |reference| over random and crafted routings."""
    x = torch.randn(num_tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    moe = layer.experts
    routings = [select_experts(layer.gate(x), args.top_k, True)]
    routings += [crafted_routing(num_tokens, args, load) for load in ("all-on-one-expert", "few-experts-rest-empty")]
    worst = 0.0
    for r in routings:
        ref = fused_experts_reference(x, moe.gate_up_proj, moe.down_proj, r).float()
        got = fused_experts(x, moe.gate_up_proj, moe.down_proj, r.weights, r.ids).float()
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return worst


def time_graph(layers: list[Layer], x: torch.Tensor, tiles: MoeTiles | None, reps: int,
               down: MoeTiles | None = None, slot_mapping: torch.Tensor | None = None) -> float:
    """Median seconds per layer, replaying all layers in one CUDA graph."""
    def run():
        for layer in layers:
            layer(x, tiles, down, slot_mapping)
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(layers)


def time_each(layers: list[Layer], x: torch.Tensor, configs: list[MoeTiles], reps: int, label: str,
              down: bool = False) -> list[tuple[float, MoeTiles]]:
    """(seconds per layer, tiles) of each config (for both GEMMs, or with `down` for the down
    GEMM alone); one the GPU cannot run is reported and left out."""
    timed = []
    for t in configs:
        try:
            timed.append((time_graph(layers, x, None if down else t, reps, down=t if down else None), t))
        except Exception as e:  # e.g. a tile that needs more shared memory than the GPU has
            print(f"  {label} {t}: skipped ({type(e).__name__})")
            torch.cuda.synchronize()
    return timed


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        layers = [Layer(args) for _ in range(args.layers)]
    torch.set_default_dtype(torch.float32)
    print(f"{torch.cuda.get_device_name()}: hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, "
          f"moe_intermediate {args.inter}, bf16, {args.layers} layers per graph, median of {args.reps} replays")
    rows, ok = [], True
    for bs in args.batches:
        err = check(layers[0], bs, args)
        ok &= err <= 2e-2
        x = torch.randn(bs, args.hidden, device="cuda", dtype=torch.bfloat16)
        touched = sum(layer.touched_bytes(x) for layer in layers) / len(layers)
        seconds = time_graph(layers, x, None, args.reps)
        best = None
        if args.sweep:
            timed = time_each(layers, x, SWEEP, args.reps, f"sweep bs={bs:4d}")
            best = min(timed, key=lambda r: r[0])
            for s, t in timed:
                print(f"  sweep bs={bs:4d} {t}: {s * 1e6:8.1f} us")
        if args.sweep_down:
            for s, t in time_each(layers, x, DOWN_SWEEP, args.reps, f"down sweep bs={bs:4d}", down=True):
                print(f"  down sweep bs={bs:4d} (N, K, warps, stages) {tuple(t)[1:]}: {s * 1e6:8.1f} us "
                      f"(table: {seconds * 1e6:.1f})")
        if args.padding:
            padded = next(s for s in graph_batch_sizes(512) if s >= bs)
            xp = torch.randn(padded, args.hidden, device="cuda", dtype=torch.bfloat16)
            slots = torch.arange(padded, device="cuda")
            slots[bs:] = -1
            routed = time_graph(layers, xp, None, args.reps)
            nowhere = time_graph(layers, xp, None, args.reps, slot_mapping=slots)
            print(f"  padding bs={bs:4d} -> graph {padded:4d}: padding routed {routed * 1e6:8.1f} us, "
                  f"routed nowhere {nowhere * 1e6:8.1f} us ({routed / nowhere:.2f}x)")
        rows.append((bs, touched, seconds, err, best))
    print(f"\n{'batch':>5} {'tiles (M,N,K,warps,stages)':>27} {'down (N,K,w,s)':>16} {'MiB touched':>11} {'us/layer':>9} {'TB/s':>6} "
          f"{'x bound':>7} {'TFLOP/s':>7} {'rel err':>8}" + (f" {'best sweep':>34}" if args.sweep else ""))
    for bs, touched, seconds, err, best in rows:
        bound = touched / (H200_TBPS * 1e12)
        tiles, down = tiles_for(bs)
        down = "same" if down == tiles else str(tuple(down)[1:])
        line = (f"{bs:>5} {str(tuple(tiles)):>27} {down:>16} {touched / 2**20:>11.1f} {seconds * 1e6:>9.1f} "
                f"{touched / seconds / 1e12:>6.2f} {seconds / bound:>7.2f} "
                f"{6 * bs * args.top_k * args.hidden * args.inter / seconds / 1e12:>7.0f} {err:>8.1e}")
        if best is not None:
            line += f" {str(tuple(best[1])):>24} {best[0] * 1e6:>8.1f}us"
        print(line)
    if not ok:
        print("FAILED: the kernel disagrees with the torch reference (rel err > 2e-2)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
