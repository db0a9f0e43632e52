"""How close does the decode attention kernel come to merely reading its KV cache?

On one paged cache (Qwen3-0.6B layer: 8 KV heads x 128, 256-token blocks, random block
tables, sequences longest first) it times, as CUDA-graph replays with L2 flushed between
runs: the decode kernel as the engine calls it and at 1 and 2 splits; kernels that only
read and sum the same K/V bytes, per (sequence, KV head) in the decode kernel's tiles and as
one contiguous range; and a torch copy. TB/s
are bytes of K and V read per second.

    python benchmarks/kv_read_floor.py            # GPU machine
"""
import itertools
import random
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package
from nanovllm.kernels.paged_decode import paged_decode_attention  # noqa: E402

HEADS, HEAD_DIM, BLOCK_SIZE, GROUP = 8, 128, 256, 2
BATCHES = ((186, 100, 1800), (256, 1024, 1024), (64, 2048, 3072))  # (sequences, fewest keys, most keys)


@triton.jit
def _read_contiguous(x_ptr, out_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * CHUNK
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CHUNK, BLOCK):
        acc += tl.load(x_ptr + base + i + offs, mask=base + i + offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _read_paged(k_ptr, v_ptr, out_ptr, bt_ptr, lens_ptr, stride_block, stride_slot, stride_bt,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """grid (KV heads, sequences): a head's [BLOCK_N, WIDTH = head_dim] key tiles, read
    through the block table as the decode kernel reads them, and summed."""
    col = tl.program_id(0) * WIDTH
    seq = tl.program_id(1)
    n = tl.load(lens_ptr + seq)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WIDTH)
    acc = tl.zeros([BLOCK_N, WIDTH], tl.float32)
    for start in range(0, n, BLOCK_N):
        page = tl.load(bt_ptr + seq * stride_bt + start // BLOCK_SIZE).to(tl.int64)
        rows = page * stride_block + (start % BLOCK_SIZE + offs_n) * stride_slot + col
        mask = (start + offs_n < n)[:, None]
        k = tl.load(k_ptr + rows[:, None] + offs_w[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] + offs_w[None, :], mask=mask, other=0.0)
        acc += k.to(tl.float32) * v.to(tl.float32)
    tl.store(out_ptr + seq * tl.num_programs(0) + tl.program_id(0), tl.sum(tl.sum(acc, 1), 0))


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=300, return_mode="median")


def paged_cache(batch: int, lo: int, hi: int, rng: random.Random):
    lens = sorted((rng.randint(lo, hi) for _ in range(batch)), reverse=True)  # longest first, as the engine
    blocks = [triton.cdiv(n, BLOCK_SIZE) for n in lens]
    perm = torch.randperm(sum(blocks), dtype=torch.int32)
    table = torch.full((batch, max(blocks)), -1, dtype=torch.int32)
    for s, (b, first) in enumerate(zip(blocks, itertools.accumulate(blocks, initial=0))):
        table[s, :b] = perm[first:first + b]
    k = torch.randn(sum(blocks), BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return lens, table.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda"), k, torch.randn_like(k)


def main() -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    for _ in range(200):  # clocks up before the first measurement
        a @ a
    print(torch.cuda.get_device_name())
    for batch, lo, hi in BATCHES:
        lens, table, ctx, k, v = paged_cache(batch, lo, hi, rng)
        q = torch.randn(batch, HEADS * GROUP, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        nbytes = sum(lens) * HEADS * HEAD_DIM * 2 * 2
        out = torch.empty(batch * HEADS, device="cuda")
        paged = dict(stride_block=k.stride(0), stride_slot=k.stride(1), stride_bt=table.stride(0),
                     BLOCK_SIZE=BLOCK_SIZE, num_stages=3)
        both = torch.cat([k.view(-1)[: nbytes // 4], v.view(-1)[: nbytes // 4]])
        copy = torch.empty_like(both)
        chunk = 1 << 16
        times = {
            "decode attention (engine's splits)": graph_ms(lambda: paged_decode_attention(q, k, v, ctx, table, 0.09)),
            "decode attention, 1 split": graph_ms(lambda: paged_decode_attention(q, k, v, ctx, table, 0.09,
                                                                                 num_splits=1)),
            "decode attention, 2 splits": graph_ms(lambda: paged_decode_attention(q, k, v, ctx, table, 0.09,
                                                                                  num_splits=2)),
            "read, per KV head, 64-key tiles": graph_ms(lambda: _read_paged[(HEADS, batch)](
                k, v, out, table, ctx, **paged, BLOCK_N=64, WIDTH=HEAD_DIM, num_warps=4)),
            "read, contiguous": graph_ms(lambda: _read_contiguous[(triton.cdiv(both.numel(), chunk),)](
                both, out, both.numel(), CHUNK=chunk, BLOCK=2048, num_warps=8)),
        }
        copy_ms = graph_ms(lambda: copy.copy_(both))
        print(f"== {batch} sequences, {lo}-{hi} keys: {nbytes / 1e9:.2f} GB of K and V")
        for name, ms in times.items():
            print(f"  {name:36s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e9:5.2f} TB/s")
        print(f"  {'torch copy (read + write)':36s} {copy_ms * 1e3:8.1f} us  {2 * nbytes / copy_ms / 1e9:5.2f} TB/s")


if __name__ == "__main__":
    main()
