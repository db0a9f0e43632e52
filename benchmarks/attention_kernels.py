"""Time our Triton paged-attention kernels against FlashAttention 2 on one GPU.

Qwen3-0.6B attention shapes (16 query heads, 8 KV heads, head_dim 128, bf16), a paged
KV cache of 256-token blocks with randomly permuted block tables. Every kernel's output
is checked against the torch reference (rel. error ||out - ref|| / ||ref||) before it is
timed with triton.testing.do_bench (median; it flushes L2 between runs).

  decode:  one query per sequence over `--context` cached keys, batch 1 / 64 / 256;
           GB/s = bytes of K and V each sequence attends to / time (with --share, more than
           the kernel reads: a unit reads its shared keys once)
  prefill: `--prompt-len`-token fresh prompts, causal, KV read from the paged cache
  "fp8 KV" rows read the same K/V quantized to e4m3 with per-token scales (kv_cache_dtype
  "fp8"; their bytes include the scales), checked against the reference on that cache.

Usage (GPU machine): python benchmarks/attention_kernels.py [--sweep-splits] [--tune]
"""
import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 64, 256], help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="cached keys per decode sequence")
    p.add_argument("--context-min", type=int, help="draw each decode sequence's keys uniformly from "
                   "[--context-min, --context] (a real batch's mix of lengths) instead of --context for all")
    p.add_argument("--prefill-batches", type=int, nargs="*", default=[1, 4], help="prompts per prefill step")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--share", type=int, default=1, help="decode sequences in groups of this many hold the "
                   "same first --shared-len keys (n samples of one prompt); times units against every row alone")
    p.add_argument("--shared-len", type=int, default=512, help="keys each group shares (whole blocks)")
    p.add_argument("--sweep-splits", action="store_true", help="also time decode at fixed split counts")
    p.add_argument("--tune", action="store_true", help="also time other tile/warp/stage configs")
    p.add_argument("--no-flash", action="store_true", help="skip flash-attn even if installed")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    return p.parse_args(argv)


def load_flash(disabled: bool):
    if disabled:
        return None
    try:
        import flash_attn
    except ImportError:
        print("note: flash_attn is not installed; its rows are skipped")
        return None
    return flash_attn


class PagedKV:
    """Random K/V for `num_seqs` sequences of `k_len` keys in randomly permuted cache blocks."""

    def __init__(self, num_seqs: int, k_len: int, args: argparse.Namespace, k_min: int | None = None,
                 share: int = 1):
        blocks_per_seq = math.ceil(k_len / args.block_size)
        num_blocks = num_seqs * blocks_per_seq
        shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
        self.k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        self.v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
        self.block_tables = perm.view(num_seqs, blocks_per_seq)  # [num_seqs, blocks_per_seq]
        if k_min is None:
            self.context_lens = torch.full((num_seqs,), k_len, dtype=torch.int32, device="cuda")
        else:
            self.context_lens = torch.randint(k_min, k_len + 1, (num_seqs,), dtype=torch.int32, device="cuda")
        if share > 1:  # each group's members hold its first member's first blocks
            shared_blocks = args.shared_len // args.block_size
            if not 0 < shared_blocks * args.block_size < int(self.context_lens.min()):
                raise SystemExit(f"--shared-len {args.shared_len}: share whole blocks, fewer than every context")
            first = torch.arange(num_seqs, device="cuda") // share * share
            self.block_tables[:, :shared_blocks] = self.block_tables[first, :shared_blocks]
        keys = int(self.context_lens.sum())
        self.kv_bytes = 2 * keys * args.num_kv_heads * args.head_dim * 2  # K and V, bf16

    def fp8(self) -> tuple[dict, int]:
        """The caches quantized to e4m3 (keyword arguments of the kernels and the reference),
        and the bytes a pass over them reads: one per element plus a float32 scale per row."""
        from nanovllm.kernels.fp8 import quantize_fp8
        k_cache, k_scale = quantize_fp8(self.k_cache)
        v_cache, v_scale = quantize_fp8(self.v_cache)
        head_dim = self.k_cache.shape[-1]
        nbytes = self.kv_bytes // 2 // head_dim * (head_dim + 4)
        return dict(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale), nbytes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_ms(fn, rep_ms: int, graph: bool = False) -> float:
    """Median ms of fn; graph=True times a CUDA-graph replay of it (how the engine runs
    decode), which leaves Python launch overhead out of microsecond-scale kernels."""
    from triton.testing import do_bench
    if graph:
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def warm_up_clocks(seconds: float = 1.0) -> None:
    """Busy the GPU before the first measurement: an idle GPU starts at low clocks."""
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > seconds * 1e3:
            return


def check(name: str, out: torch.Tensor, ref: torch.Tensor, max_err: float = 2e-2) -> float:
    err = rel_err(out, ref)
    if not err < max_err:  # NaN fails too
        raise SystemExit(f"{name}: rel. error {err:.2e} against the torch reference (max {max_err})")
    return err


# ----------------------------------------------------------------------------- decode
def decode_rows(batch: int, args: argparse.Namespace, flash) -> list[tuple]:
    from nanovllm.engine.input_batch import decode_units
    from nanovllm.kernels.paged_decode import paged_decode_attention
    from nanovllm.layers.backends.torch_ref import paged_attention_ref
    from nanovllm.utils.context import decode_unit_size

    kv = PagedKV(batch, args.context, args, args.context_min, args.share)
    q = torch.randn(batch, args.num_heads, args.head_dim, dtype=torch.bfloat16, device="cuda")
    scale = args.head_dim ** -0.5
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    ref = paged_attention_ref(q, kv.k_cache, kv.v_cache, cu_q, kv.context_lens, kv.block_tables, scale)

    # "longest first": every row alone, started by context length; "units": the engine's
    # grouping of rows that share leading blocks (the same as alone when none do)
    tables, lens = kv.block_tables.cpu().numpy(), kv.context_lens.cpu().numpy()
    alone = [t.cuda() for t in decode_units(tables, lens, args.block_size, 1)]
    units = [t.cuda() for t in decode_units(tables, lens, args.block_size,
                                            decode_unit_size(args.num_heads, args.num_kv_heads))]
    variants = {"triton (auto splits)": (None, (None, None)), "triton longest first": (None, alone)}
    if args.share > 1:
        variants[f"triton units of {args.share} sharing {args.shared_len}"] = (None, units)
    if args.sweep_splits:
        for s in (1, 2, 4, 8, 16, 32):
            variants.update({f"triton splits={s}": (s, (None, None)), f"triton splits={s} longest first": (s, alone)})
    rows = []
    for name, (splits, (unit_table, shared_lens)) in variants.items():
        fn = lambda: paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.context_lens,  # noqa: E731
                                            kv.block_tables, scale, num_splits=splits, units=unit_table,
                                            shared_lens=shared_lens)
        err = check(name, fn(), ref)
        rows.append(("decode", batch, name, bench_ms(fn, args.rep_ms, graph=True), err, kv.kv_bytes))
    fp8, fp8_bytes = kv.fp8()
    ref8 = paged_attention_ref(q, fp8["k_cache"], fp8["v_cache"], cu_q, kv.context_lens, kv.block_tables, scale,
                               fp8["k_scale"], fp8["v_scale"])
    fn = lambda: paged_decode_attention(q, fp8["k_cache"], fp8["v_cache"], kv.context_lens,  # noqa: E731
                                        kv.block_tables, scale, k_scale=fp8["k_scale"], v_scale=fp8["v_scale"])
    err = check("triton fp8 KV decode", fn(), ref8)
    rows.append(("decode", batch, "triton fp8 KV (auto splits)", bench_ms(fn, args.rep_ms, graph=True), err,
                 fp8_bytes))
    if flash is not None:
        fn = lambda: flash.flash_attn_with_kvcache(  # noqa: E731
            q.unsqueeze(1), kv.k_cache, kv.v_cache, cache_seqlens=kv.context_lens,
            block_table=kv.block_tables, softmax_scale=scale, causal=True).squeeze(1)
        err = check("flash decode", fn(), ref)
        rows.append(("decode", batch, "flash_attn_with_kvcache", bench_ms(fn, args.rep_ms, graph=True), err,
                     kv.kv_bytes))
    return rows


# ----------------------------------------------------------------------------- prefill
def prefill_rows(batch: int, args: argparse.Namespace, flash) -> list[tuple]:
    from nanovllm.kernels.paged_prefill import paged_prefill_attention
    from nanovllm.layers.backends.torch_ref import paged_attention_ref

    length = args.prompt_len
    kv = PagedKV(batch, length, args)
    q = torch.randn(batch * length, args.num_heads, args.head_dim, dtype=torch.bfloat16, device="cuda")
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
    scale = args.head_dim ** -0.5
    ref = paged_attention_ref(q, kv.k_cache, kv.v_cache, cu, kv.context_lens, kv.block_tables, scale)
    flops = 4 * batch * args.num_heads * args.head_dim * length * (length + 1) / 2  # causal QK^T and PV

    fn = lambda: paged_prefill_attention(q, kv.k_cache, kv.v_cache, cu, kv.context_lens,  # noqa: E731
                                         kv.block_tables, length, scale)
    rows = [("prefill", batch, "triton", bench_ms(fn, args.rep_ms), check("triton prefill", fn(), ref), flops)]
    fp8, _ = kv.fp8()
    ref8 = paged_attention_ref(q, fp8["k_cache"], fp8["v_cache"], cu, kv.context_lens, kv.block_tables, scale,
                               fp8["k_scale"], fp8["v_scale"])
    fn = lambda: paged_prefill_attention(q, fp8["k_cache"], fp8["v_cache"], cu, kv.context_lens,  # noqa: E731
                                         kv.block_tables, length, scale, fp8["k_scale"], fp8["v_scale"])
    rows.append(("prefill", batch, "triton fp8 KV", bench_ms(fn, args.rep_ms), check("triton fp8 prefill", fn(), ref8),
                 flops))
    if flash is not None:
        fn = lambda: flash.flash_attn_varlen_func(  # noqa: E731
            q, kv.k_cache, kv.v_cache, cu, cu, length, length, softmax_scale=scale, causal=True,
            block_table=kv.block_tables)
        err = check("flash prefill", fn(), ref)
        rows.append(("prefill", batch, "flash_attn_varlen_func", bench_ms(fn, args.rep_ms), err, flops))
    return rows


# ----------------------------------------------------------------------------- tuning
def tune_rows(args: argparse.Namespace) -> list[tuple]:
    """Time other tile configs by swapping the kernels' config functions (GPU only)."""
    from nanovllm.kernels import paged_decode, paged_prefill
    from nanovllm.kernels.attention_common import KernelConfig

    rows = []
    decode_cfgs = [KernelConfig(0, n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4), (2, 3))]
    prefill_cfgs = [KernelConfig(m, n, w, s) for m, n, w, s in
                    [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2),
                     (128, 128, 8, 3), (64, 128, 4, 2)]]
    original = paged_decode._decode_config, paged_prefill._prefill_config
    try:
        for cfg in decode_cfgs:
            paged_decode._decode_config = lambda q, cfg=cfg: cfg
            rows += _tuned(cfg, [lambda b=b: decode_rows(b, args, None) for b in args.batches])
        for cfg in prefill_cfgs:
            paged_prefill._prefill_config = lambda q, cfg=cfg: cfg
            rows += _tuned(cfg, [lambda b=b: prefill_rows(b, args, None) for b in args.prefill_batches])
    finally:
        paged_decode._decode_config, paged_prefill._prefill_config = original
    return rows


def _tuned(cfg, runs) -> list[tuple]:
    """Rows of one config, renamed after it; a config that can't compile is reported and skipped."""
    from triton.runtime.errors import OutOfResources
    try:
        return [r[:2] + (f"{r[2]} {tuple(cfg)}",) + r[3:] for run in runs for r in run()]
    except OutOfResources as e:
        print(f"config {tuple(cfg)} skipped: {e}")
        return []


def print_table(rows: list[tuple]) -> None:
    print(f"{'op':8} {'batch':>5}  {'kernel':44} {'median ms':>10} {'rel err':>9}  {'GB/s | TFLOP/s':>14}")
    for op, batch, name, ms, err, work in rows:
        rate = work / ms / 1e6 if op == "decode" else work / ms / 1e9  # GB/s of KV | TFLOP/s
        print(f"{op:8} {batch:5d}  {name:44} {ms:10.4f} {err:9.2e}  {rate:14.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    flash = load_flash(args.no_flash)
    warm_up_clocks()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; heads {args.num_heads}/"
          f"{args.num_kv_heads}, head_dim {args.head_dim}, bf16, block size {args.block_size}, decode context "
          f"{args.context if args.context_min is None else f'{args.context_min}-{args.context}'}, prompt length {args.prompt_len}; decode timed as CUDA-graph replays")
    rows = []
    for batch in args.batches:
        rows += decode_rows(batch, args, flash)
    for batch in args.prefill_batches:
        rows += prefill_rows(batch, args, flash)
    if args.tune:
        rows += tune_rows(args)
    print_table(rows)


if __name__ == "__main__":
    main()
