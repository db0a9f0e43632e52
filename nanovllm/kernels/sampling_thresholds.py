"""Top-k, top-p and min-p as one logit threshold per row (Triton), so the one-pass sampler
(`kernels/sampling.py`) draws among the ids whose logit reaches it, with no sort.

The filters keep, of each row's distribution softmax(x / T) (after the grammar bitmask, if any):
  top-k: the ids whose logit is at least the k-th largest;
  top-p: of those, the most likely ids down to the one whose mass crosses p (mass of the
         top-k renormalized distribution, as the sorting sampler in `layers/sampler.py`);
  min-p: the ids whose probability is at least min_p times the largest, i.e. x >= max + T ln(min_p).
Each keeps every id with x >= its threshold; the row keeps x >= the largest of the three.
NOTE: ids tied with the last one kept are all kept, where a sort would keep some of them.

The k-th largest logit and the top-p crossing logit are found by searching the order-keyed
bits of float32 (an int32 whose order is the floats' order): each pass over the row counts
(or sums the mass of) the ids at or above 15 candidate keys at once and narrows the range
16-fold, so 8 passes pin a float32 key exactly, 4 a bfloat16 one (its low 16 bits are 0).
One program per row: its sums run in a fixed order, so a row's threshold never depends on
the batch. The row stays in L2 across passes (152k bf16 logits are 300 KB).

  logits:       [num_rows, vocab] any float dtype (not modified)
  temperatures: [num_rows] float32, 0 = greedy (no threshold: -inf)
  top_k:        [num_rows] int64, 0 = off; top_p: [num_rows] float32, 1 = off;
  min_p:        [num_rows] float32, 0 = off; each may be None (off for every row)
  bitmask / mask_rows: as `gumbel_argmax` (the grammar's allowed ids)
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.sampling import bitmask_row, masked_logits

BLOCK = 512        # ids per load ([BLOCK, CANDIDATES] comparisons a step stay in registers)
CANDIDATES = 16    # keys tested per pass (15 cut points and the range's start): 4 bits a pass


@triton.jit
def _order_key(x):
    """float32 -> int32 in the same order (negative floats: their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _search(row_ptr, words_ptr, mask_row, vocab, target, floor_key, row_max, scale, lo, hi,
            MASS: tl.constexpr, SHIFT: tl.constexpr, PASSES: tl.constexpr, MASKED: tl.constexpr,
            BLOCK: tl.constexpr, CANDIDATES: tl.constexpr):
    """The largest key K in [lo, hi] (keys >> SHIFT, as int64) with S(K) >= target, where S(K)
    counts (MASS: sums exp2((x - row_max) * scale) over) the ids with floor_key <= key, K <= key.
    Needs S(lo) >= target and S(hi + 1) < target."""
    offs_c = tl.arange(0, CANDIDATES)
    for _ in tl.static_range(PASSES):
        step = (hi - lo + CANDIDATES) // CANDIDATES  # >= 1: candidates lo, lo + step, ... cover [lo, hi]
        cand = lo + offs_c.to(tl.int64) * step  # [CANDIDATES]
        # NOTE: summed per lane and reduced once a pass: a reduction per block costs barriers
        total = tl.zeros([BLOCK, CANDIDATES], tl.float32)
        for start in range(0, vocab, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            x = masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED)
            key = (_order_key(x) >> SHIFT).to(tl.int64)
            if MASS:
                w = tl.exp2((x - row_max) * scale)
            else:
                w = tl.where(x > float("-inf"), 1.0, 0.0)
            w = tl.where(key >= floor_key, w, 0.0)
            total += tl.where(key[:, None] >= cand[None, :], w[:, None], 0.0)
        # the last candidate that still reaches the target opens the next range
        reach = (tl.sum(total, 0) >= target) & (cand <= hi)
        best = tl.max(tl.where(reach, cand, lo), 0)
        hi = tl.minimum(best + step - 1, hi)
        lo = best
    return lo


@triton.jit
def _from_key(key, lowest, SHIFT: tl.constexpr):
    """The float32 whose order key (>> SHIFT) is `key`; -inf for `lowest` (below every logit)."""
    bits = (key << SHIFT).to(tl.int32)
    x = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)
    return tl.where(key > lowest, x, float("-inf"))


@triton.jit
def _threshold_kernel(logits_ptr, temps_ptr, top_k_ptr, top_p_ptr, min_p_ptr, mask_ptr, mask_rows_ptr, out_ptr,
                      vocab, stride_row, num_words,
                      TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, MASKED: tl.constexpr,
                      SHIFT: tl.constexpr, PASSES: tl.constexpr, BLOCK: tl.constexpr, CANDIDATES: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(temps_ptr + row)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    mask_row, words_ptr = bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED)
    row_max = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        x = masked_logits(row_ptr, words_ptr, mask_row, start + tl.arange(0, BLOCK), vocab, MASKED)
        row_max = tl.maximum(row_max, tl.max(x, 0))
    scale = 1.4426950408889634 / tl.where(temp > 0.0, temp, 1.0)  # log2(e) / T: weights exp2((x - max) * scale)
    # keys, >> SHIFT, as int64: -2^31 >> SHIFT is below every real logit's key
    lowest = tl.full([], -2147483648, tl.int64) >> SHIFT
    top = (_order_key(row_max) >> SHIFT).to(tl.int64)
    threshold = tl.full([], float("-inf"), tl.float32)
    floor_key = lowest
    sampled = (temp > 0.0) & (row_max > float("-inf"))  # greedy rows take the argmax: no threshold
    if TOP_K:
        k = tl.load(top_k_ptr + row)
        if (k > 0) & sampled:
            floor_key = _search(row_ptr, words_ptr, mask_row, vocab, k.to(tl.float32), lowest, row_max, scale,
                                lowest, top, False, SHIFT, PASSES, MASKED, BLOCK, CANDIDATES)
            threshold = _from_key(floor_key, lowest, SHIFT)
    if TOP_P:
        p = tl.load(top_p_ptr + row)
        if (p < 1.0) & sampled:
            kept = tl.zeros([BLOCK], tl.float32)  # the mass top-k left
            for start in range(0, vocab, BLOCK):
                x = masked_logits(row_ptr, words_ptr, mask_row, start + tl.arange(0, BLOCK), vocab, MASKED)
                key = (_order_key(x) >> SHIFT).to(tl.int64)
                kept += tl.where(key >= floor_key, tl.exp2((x - row_max) * scale), 0.0)
            crossing = _search(row_ptr, words_ptr, mask_row, vocab, p * tl.sum(kept, 0), floor_key, row_max, scale,
                               floor_key, top, True, SHIFT, PASSES, MASKED, BLOCK, CANDIDATES)
            threshold = tl.maximum(threshold, _from_key(crossing, lowest, SHIFT))
    if MIN_P:
        min_p = tl.load(min_p_ptr + row)
        if (min_p > 0.0) & sampled:
            threshold = tl.maximum(threshold, row_max + temp * tl.log(min_p))
    tl.store(out_ptr + row, threshold)


def sampling_thresholds(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor | None,
                        top_p: torch.Tensor | None, min_p: torch.Tensor | None, bitmask: torch.Tensor | None = None,
                        mask_rows: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """[num_rows] float32: each row keeps the ids with logit >= its threshold (-inf: all).
    (`block`: a power of two; smaller ones let tests cross blocks cheaply.)"""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    # bfloat16 widens to float32 with 16 zero low bits: their keys differ in the high 16 alone
    shift = 16 if logits.dtype == torch.bfloat16 else 0
    masked = bitmask is not None
    any_ = temperatures  # a placeholder pointer for the absent inputs (never read)
    _threshold_kernel[(num_rows,)](
        logits, temperatures.contiguous(), any_ if top_k is None else top_k.contiguous(),
        any_ if top_p is None else top_p.contiguous(), any_ if min_p is None else min_p.contiguous(),
        bitmask.contiguous() if masked else any_, mask_rows if masked else any_, out,
        vocab, logits.stride(0), bitmask.shape[1] if masked else 0,
        TOP_K=top_k is not None, TOP_P=top_p is not None, MIN_P=min_p is not None, MASKED=masked,
        SHIFT=shift, PASSES=(32 - shift) // 4, BLOCK=block, CANDIDATES=CANDIDATES, num_warps=8)
    return out
