"""Top-k / top-p / min-p thresholds (`kernels/sampling_thresholds.py`) against the ids the
sorting PyTorch sampler keeps. On CPU the kernel runs in Triton's interpreter (small
vocabularies, small blocks so rows cross block borders); the `cuda` case runs the engine's
vocabulary. The Sampler's CUDA runs of tests/unit/test_sampler.py check the draws' distribution."""
import math
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

from nanovllm.kernels.sampling_thresholds import sampling_thresholds, tile_bounds  # noqa: E402
from nanovllm.layers.sampler import apply_min_p, apply_top_k, apply_top_k_top_p  # noqa: E402
from tests.kernels.test_sampling_kernel import masked_case  # noqa: E402

SMALL = dict(chunk=64, block=32, tile=8)   # rows of 100-257 ids span 2-5 chunks, 13-33 tiles


def reference_kept(logits, temps, top_k, top_p, min_p) -> torch.Tensor:
    """[rows, vocab] bool: the ids the sorting sampler keeps (sampled rows only)."""
    x = logits.float() / temps[:, None]
    if top_p is not None:
        apply_top_k_top_p(x, top_k, top_p)
    elif top_k is not None:
        apply_top_k(x, top_k, int(top_k.max()))
    probs = x.softmax(dim=-1)
    if min_p is not None:
        apply_min_p(probs, min_p)
    return probs > 0


def settings(rows: int, gen: torch.Generator):
    pick = lambda values: torch.tensor(values)[torch.randint(len(values), (rows,), generator=gen)]  # noqa: E731
    temps = pick([0.5, 1.0, 1.7])
    top_k = pick([0, 1, 5, 40, 1000])
    top_p = pick([1.0, 0.0, 0.3, 0.9, 0.99])
    min_p = pick([0.0, 0.02, 0.3])
    return temps.float(), top_k.long(), top_p.float(), min_p.float()


@pytest.mark.parametrize("which", ["top_k", "top_p", "min_p", "all"])
def test_float32_thresholds_keep_what_the_sort_keeps(which):
    gen = torch.Generator().manual_seed(zlib.crc32(which.encode()))
    rows, vocab = 6, 150
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[0, 100:] = -math.inf            # disallowed ids (a ban) never count
    temps, top_k, top_p, min_p = settings(rows, gen)
    use = dict(top_k=top_k if which in ("top_k", "all") else None, top_p=top_p if which in ("top_p", "all") else None,
               min_p=min_p if which in ("min_p", "all") else None)
    thresholds = sampling_thresholds(logits, temps, **use, **SMALL)
    kept = logits >= thresholds[:, None]
    assert torch.equal(kept & logits.isfinite(), reference_kept(logits, temps, **use))


def test_peaked_rows_as_a_trained_models():
    # a few ids hold most of the mass, as in a trained model's rows: the tile maxima then bound
    # each search close to the max and the passes read a few tiles. Rows 4-7 cluster the peaks
    # in one tile, which leaves the bound far lower (the k-th tile maximum is a bulk id).
    gen = torch.Generator().manual_seed(11)
    rows, vocab = 8, 240
    logits = torch.randn(rows, vocab, generator=gen)
    for row in range(rows):
        peaks = torch.randperm(vocab, generator=gen)[:12] if row < 4 else torch.arange(40, 52)
        logits[row, peaks] += 6.0 + 4.0 * torch.rand(len(peaks), generator=gen)
    temps = torch.tensor([0.5, 1.0, 1.7, 1.0] * 2)
    top_k = torch.tensor([0, 3, 8, 20, 0, 5, 1, 12])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.99, 0.8, 1.0, 0.6])
    thresholds = sampling_thresholds(logits, temps, top_k, top_p, None, **SMALL)
    assert torch.equal(logits >= thresholds[:, None], reference_kept(logits, temps, top_k, top_p, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_passes_read_only_the_tiles_the_sorted_tile_maxima_bound(dtype):
    # the lower bound is the k-th largest tile maximum, or (top-p alone) the largest one whose
    # sorted tile maxima above it hold p of the row's mass; the passes read the tiles reaching it
    gen = torch.Generator().manual_seed(5)
    rows, vocab, tile = 16, 240, 8
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    logits[1, :200] = -math.inf            # 5 finite tiles: top-k 12 has no bound
    temps = torch.tensor([0.5, 1.0, 1.7, 1.0, 0.0, 0.7, 1.3, 1.0] * 2)
    top_k = torch.tensor([0, 12, 8, 20, 5, 0, 1, 3] + [0] * 8)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 1.0, 0.6, 1.0, 1.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99])
    _, bound, tiles = tile_bounds(logits, temps, top_k, top_p, None, None, chunk=64, block=32, tile=tile)
    tile_max = logits.float().view(rows, -1, tile).amax(-1)
    for row in range(rows):
        ranked = tile_max[row].sort(descending=True).values
        if temps[row] == 0:
            expected = torch.zeros(0, dtype=torch.long)       # greedy: no search
        else:
            if top_k[row] > 0:
                finite = int(ranked.isfinite().sum())
                lowest = ranked[top_k[row] - 1] if top_k[row] <= finite else -math.inf
            else:
                x = logits[row].double() / temps[row]
                mass = (ranked.double() / temps[row] - x.max()).exp().cumsum(0)
                short = int((mass < top_p[row] * (x - x.max()).exp().sum()).sum())   # tiles short of p
                lowest = ranked[short] if short < len(ranked) else -math.inf
            expected = torch.nonzero((tile_max[row] >= lowest) & tile_max[row].isfinite()).flatten()
        count = int(bound[row, 1])
        assert count == len(expected), f"row {row}"
        assert torch.equal(tiles[row, :count].long().sort().values, expected), f"row {row}"


def test_bfloat16_ties_at_the_threshold_are_all_kept():
    # bfloat16 logits tie often: the threshold keeps every id tied with the last one the sort
    # keeps, and nothing else beyond the sort's ids
    gen = torch.Generator().manual_seed(7)
    rows, vocab = 8, 257
    logits = (torch.randn(rows, vocab, generator=gen) * 2).bfloat16()
    temps, top_k, top_p, min_p = settings(rows, gen)
    thresholds = sampling_thresholds(logits, temps, top_k, top_p, min_p, **SMALL)
    kept = logits.float() >= thresholds[:, None]
    ref = reference_kept(logits, temps, top_k, top_p, min_p)
    assert (kept | ~ref).all(), "every id the sort keeps is kept"
    last = torch.where(ref, logits.float(), math.inf).min(dim=1).values
    assert torch.equal(kept, logits.float() >= last[:, None]), "beyond them, only ties of the last one"


def test_greedy_and_unfiltered_rows_keep_everything_and_top_p_0_keeps_the_max():
    logits = torch.randn(4, 100)
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0])
    top_p = torch.tensor([0.5, 1.0, 1.0, 0.0])
    thresholds = sampling_thresholds(logits, temps, None, top_p, None, **SMALL)
    assert thresholds[:3].tolist() == [-math.inf] * 3
    assert thresholds[3] == logits[3].max()


def test_grammar_bitmask_filters_before_the_thresholds():
    rows, vocab = 6, 200
    logits, bitmask, mask_rows, premasked, _ = masked_case(rows, vocab)   # every other row constrained
    temps, top_k, top_p, min_p = settings(rows, torch.Generator().manual_seed(3))
    thresholds = sampling_thresholds(logits, temps, top_k, top_p, min_p, bitmask=bitmask, mask_rows=mask_rows,
                                     **SMALL)
    kept = (premasked >= thresholds[:, None]) & premasked.isfinite()
    assert torch.equal(kept, reference_kept(premasked, temps, top_k, top_p, min_p))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_vocabulary():
    """The engine's sizes: bf16 logits over Qwen3's 151,936 ids, peaked rows and flat ones.
    bf16 ties are many here (top_k 1000 may keep 1,039: all ties of the 1,000th logit), and in
    a flat row each id holds ~1e-5 of the mass, so float32 sums in another order may move the
    top-p crossing by an id or two: ids kept by one side alone are ties of either side's last
    kept logit, or hold < 1e-4 of the mass in all."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 64, 151_936
    logits = (torch.randn(rows, vocab, generator=gen, device="cuda") * 2).bfloat16()
    logits[:8, :50] += 12.0
    temps, top_k, top_p, min_p = (t.cuda() for t in settings(rows, torch.Generator().manual_seed(1)))
    thresholds = sampling_thresholds(logits, temps, top_k, top_p, min_p)
    x = logits.float()
    kept = x >= thresholds[:, None]
    ref = reference_kept(logits, temps, top_k, top_p, min_p)
    last = torch.where(ref, x, math.inf).min(dim=1).values
    tie = (x == last[:, None]) | (x == thresholds[:, None])
    probs = (logits.double() / temps[:, None].double()).softmax(dim=-1)
    assert (((kept ^ ref) & ~tie) * probs).sum(dim=1).max() < 1e-4
    assert torch.equal(kept[:8], x[:8] >= last[:8, None]), "peaked rows: the sort's ids and ties of the last"
