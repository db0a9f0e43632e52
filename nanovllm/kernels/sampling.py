"""One-pass sampling (Triton): temperature, Gumbel noise and argmax over the vocabulary in one
read of the logits. Top-k, top-p and min-p reach it as one logit threshold per row
(`kernels/sampling_thresholds.py`), so no sampling setting sorts the vocabulary.

The Gumbel-max trick: argmax_i (x_i / T - log E_i) with E_i ~ Exp(1) is a draw from
softmax(x / T), the same race the PyTorch sampler runs as argmax_i p_i / E_i, without the
float32 copy, softmax, noise tensor and division, which read and write [rows, vocab] float32
several times (~0.75 ms a step at batch 256 x 151,936 on an H200). Each program scans one
chunk of one row and keeps its best (score, index); a second kernel picks each row's best
chunk. Noise comes from Philox keyed by the row's key, counter id // 4 (one call, four ids),
so a row's draw depends on its key alone, never on the batch. Temperature-0 rows take the
plain argmax (first maximum on ties, as torch.argmax).

  logits: [num_rows, vocab] any float dtype (not modified)
  temperatures: [num_rows] float32, 0 = greedy
  keys: [num_rows] int64, the Philox key of each row's noise
  bitmask: [num_masked_rows, ceil(vocab / 32)] int32, optional: bit j of word w allows id 32 w + j
  mask_rows: [num_rows] int32, with bitmask: each row's bitmask row, -1 for a row it leaves free
  thresholds: [num_rows] float32, optional: a row draws among the ids whose logit is at least
              its threshold (top-k / top-p / min-p, from `kernels/sampling_thresholds.py`)

Applying the grammar bitmask here, as the scan reads each id, spares structured outputs the
float32 copy of the logits and the separate masking pass.
"""
import torch
import triton
import triton.language as tl

CHUNK = 8192   # vocabulary ids per program: 19 chunks x 256 rows keep every SM busy
BLOCK = 1024   # ids per load
# Exp(1) from u = 1 - v (v uniform): -log1p(-v), by its series below SERIES_BELOW where
# 1 - v would round away the small noise values that decide the largest Gumbel scores
# (a constexpr: a jitted function reads no other globals)
SERIES_BELOW = tl.constexpr(1.0 / 256)


@triton.jit
def _exponential(r):
    """Exp(1) noise from uint32 random bits, accurate near 0 (the values that decide the race),
    never 0 nor infinity."""
    a = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10   # uniform in (0, 1), fine near 0
    # the complement; a rounds to 1.0 for the top 128 r, and Exp(1) = inf there would make
    # an id that is a row's only candidate (a grammar's forced token) lose to "no id"
    b = tl.maximum(1.0 - a, 1.1641532182693481e-10)   # 2^-33
    series = a * (1.0 + a * (0.5 + a * (1.0 / 3.0 + a * 0.25)))  # -log(1 - a) for small a
    return tl.where(a < SERIES_BELOW, series, -tl.log(b))


@triton.jit
def bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED: tl.constexpr):
    """(the row's bitmask row, -1 for a free one; a pointer to its words)."""
    mask_row = -1
    words_ptr = mask_ptr
    if MASKED:
        mask_row = tl.load(mask_rows_ptr + row)   # -1: a free row reads bitmask row 0, then ignores it
        words_ptr = mask_ptr + tl.maximum(mask_row, 0).to(tl.int64) * num_words
    return mask_row, words_ptr


@triton.jit
def masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED: tl.constexpr):
    """The row's logits at idx as float32; ids past the vocabulary, ids its bitmask row
    disallows and NaN read -inf (they never win a race nor count in a sum)."""
    valid = idx < vocab
    x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
    if MASKED:  # 32 neighbouring lanes read one word: a broadcast load
        word = tl.load(words_ptr + idx // 32, mask=valid, other=0)
        x = tl.where((((word >> (idx % 32)) & 1) != 0) | (mask_row < 0), x, float("-inf"))
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _chunk_argmax_kernel(logits_ptr, temps_ptr, keys_ptr, mask_ptr, mask_rows_ptr, thresholds_ptr, part_val_ptr,
                         part_idx_ptr, vocab, stride_row, num_words, num_chunks,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, THRESHOLD: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temp = tl.load(temps_ptr + row)
    key = tl.load(keys_ptr + row)
    greedy = temp == 0.0
    inv_temp = 1.0 / tl.where(greedy, 1.0, temp)
    best_val = tl.full([BLOCK // 4, 4], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK // 4, 4], 2147483647, tl.int32)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    mask_row, words_ptr = bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED)
    if THRESHOLD:
        threshold = tl.load(thresholds_ptr + row)
    for start in tl.static_range(0, CHUNK, BLOCK):
        # ids 4g..4g+3 take the four words of Philox counter g: one call (10 rounds of
        # integer multiplies, most of this kernel's time) per four ids instead of one each
        group = (chunk * CHUNK + start) // 4 + tl.arange(0, BLOCK // 4)
        idx = group[:, None] * 4 + tl.arange(0, 4)[None, :]                 # [BLOCK // 4, 4]
        x = masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED)
        if THRESHOLD:
            x = tl.where(x >= threshold, x, float("-inf"))
        r0, r1, r2, r3 = tl.randint4x(key, group)
        bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK // 4, 4)).to(tl.uint32, bitcast=True)
        noise = -tl.log(_exponential(bits))   # Gumbel(0, 1)
        score = tl.where(greedy, x, x * inv_temp + noise)  # NaN and padding: -inf, never taken
        take = score > best_val   # strict: a lane keeps its first maximum
        best_val = tl.where(take, score, best_val)
        best_idx = tl.where(take, idx, best_idx)
    best_val, best_idx = tl.reshape(best_val, (BLOCK,)), tl.reshape(best_idx, (BLOCK,))
    top = tl.max(best_val, 0)
    first = tl.min(tl.where(best_val == top, best_idx, 2147483647), 0)
    tl.store(part_val_ptr + row * num_chunks + chunk, top)
    tl.store(part_idx_ptr + row * num_chunks + chunk, first)


@triton.jit
def _row_argmax_kernel(part_val_ptr, part_idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < num_chunks
    val = tl.load(part_val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * num_chunks + offs, mask=mask, other=2147483647)
    top = tl.max(val, 0)
    first = tl.min(tl.where(val == top, idx, 2147483647), 0)
    # NOTE: an all -inf row (the engine never sends one) would keep the sentinel: give id 0
    tl.store(out_ptr + row, tl.where(first == 2147483647, 0, first).to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
                  bitmask: torch.Tensor | None = None, mask_rows: torch.Tensor | None = None,
                  thresholds: torch.Tensor | None = None, chunk: int = CHUNK, block: int = BLOCK) -> torch.Tensor:
    """[num_rows] int64 token ids: a draw from softmax(logits / T) per row, argmax where T = 0,
    over the ids its bitmask row allows, if any, and whose logit reaches its threshold, if any.
    (`chunk`, `block`: powers of two, 4 <= block <= chunk; smaller ones let tests cross chunks cheaply.)"""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    temperatures, keys = temperatures.contiguous(), keys.contiguous()   # read as flat arrays
    num_chunks = triton.cdiv(vocab, chunk)
    part_val = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    masked = bitmask is not None
    bitmask = bitmask.contiguous() if masked else None
    _chunk_argmax_kernel[(num_rows, num_chunks)](
        logits, temperatures, keys, bitmask if masked else keys, mask_rows if masked else keys,
        keys if thresholds is None else thresholds.contiguous(),
        part_val, part_idx, vocab, logits.stride(0), bitmask.shape[1] if masked else 0, num_chunks,
        CHUNK=chunk, BLOCK=block, MASKED=masked, THRESHOLD=thresholds is not None, num_warps=4)
    _row_argmax_kernel[(num_rows,)](part_val, part_idx, out, num_chunks,
                                    BLOCK_C=max(16, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out
