"""benchmarks/kv_read_floor.py's read kernels touch exactly the K/V bytes the decode kernel
reads (each sequence's first context-length keys, through its block table), so its TB/s
compare like for like: checked against torch on a small cache in the Triton interpreter."""
import random

import torch

from benchmarks import kv_read_floor as probe


def test_paged_read_sums_each_heads_keys_through_the_block_table(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: self)  # the probe builds CUDA tensors
    monkeypatch.setattr(torch, "randn", lambda *shape, dtype, device: torch.rand(*shape, dtype=dtype))
    monkeypatch.setattr(torch, "tensor", lambda data, dtype=None, device=None: torch.as_tensor(data, dtype=dtype))
    lens, table, ctx, k, v = probe.paged_cache(3, 40, 600, random.Random(1))
    k, v = k.float(), v.float()
    out = torch.zeros(3 * probe.HEADS)
    probe._read_paged[(probe.HEADS, 3)](k, v, out, table, ctx, k.stride(0), k.stride(1), table.stride(0),
                                        BLOCK_SIZE=probe.BLOCK_SIZE, BLOCK_N=64, WIDTH=probe.HEAD_DIM)
    for s, n in enumerate(lens):
        pos = torch.arange(n)
        rows = (table[s, pos // probe.BLOCK_SIZE].long(), pos % probe.BLOCK_SIZE)
        expected = (k[rows] * v[rows]).sum((0, 2))  # [heads]
        torch.testing.assert_close(out[s * probe.HEADS:(s + 1) * probe.HEADS], expected, rtol=1e-4, atol=1e-3)


def test_contiguous_read_sums_every_element():
    x = torch.rand(10_000)
    out = torch.zeros(8)
    probe._read_contiguous[(3,)](x, out, x.numel(), CHUNK=4096, BLOCK=1024)
    torch.testing.assert_close(out[:3].sum(), x.sum(), rtol=1e-5, atol=1e-3)
