"""Sampling kernels (Triton): temperature, the grammar bitmask, a top-k / top-p / min-p threshold
and one draw per row, reading the logits once (and one chunk of each row twice). The thresholds
come from `kernels/sampling_thresholds.py`, so no sampling setting sorts the vocabulary.

A draw is an inverse-CDF lookup over softmax(x / T), in two kernels:
  1. each program scans one 8,192-id chunk of one row: the chunk's largest z = x log2(e) / T,
     its mass sum exp2(z - max), and (for greedy rows) its first largest logit;
  2. one program per row sums the chunks' masses, draws u ~ U[0, 1) from Philox keyed by the
     row's key, finds the chunk where the cumulative mass crosses u times the total, and scans
     that chunk alone (16 KB of bf16 logits; one load, one float64 prefix sum) to the id where
     it crosses.
The Gumbel race this replaces, argmax (x / T - log E) with E ~ Exp(1), drew a Philox word and
took two logarithms per id: ~113 instructions an id, ~10x the time its logits take to read
(0.23 ms of a 213-row decode step on an H100). Here an id costs two exp2 on the MUFU unit.
The draw depends on the row's key alone, never on the batch; the target and the chunk's prefix
sum are float64, so even ids far below 2^-24 of the row's mass are drawn at their rate.
Temperature-0 rows take the plain argmax (first maximum on ties, as torch.argmax).

  logits: [num_rows, vocab] any float dtype (not modified)
  temperatures: [num_rows] float32, 0 = greedy
  keys: [num_rows] int64, the Philox key of each row's draw
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

from nanovllm.kernels import attention_common

CHUNK = 8192   # vocabulary ids per program: 19 chunks x 256 rows keep every SM busy
BLOCK = 1024   # ids per load
LOG2E = tl.constexpr(attention_common.LOG2E)   # a jitted function reads constexpr globals only
# z is clamped below float32's largest value, so a tiny temperature cannot make it +inf (and
# inf - inf NaN)
HIGHEST = tl.constexpr(3.0e38)


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
def _candidates(row_ptr, words_ptr, mask_row, idx, vocab, threshold, MASKED: tl.constexpr, THRESHOLD: tl.constexpr):
    """The logits at idx that may be drawn (masked_logits, and -inf below the row's threshold)."""
    x = masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED)
    if THRESHOLD:
        x = tl.where(x >= threshold, x, float("-inf"))
    return x


@triton.jit
def _scaled(x, scale):
    """z = x log2(e) / T, finite above (-inf stays -inf: no mass)."""
    return tl.minimum(x * scale, HIGHEST)


@triton.jit
def _finite(m):
    """A running max to subtract: -inf (nothing seen yet) reads 0, so exp2(-inf - it) is 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _row_setup(temps_ptr, thresholds_ptr, row, THRESHOLD: tl.constexpr):
    """(greedy?, scale = log2(e) / T, the row's threshold)."""
    temp = tl.load(temps_ptr + row)
    greedy = temp == 0.0
    scale = LOG2E / tl.where(greedy, 1.0, temp)
    threshold = float("-inf")
    if THRESHOLD:
        threshold = tl.load(thresholds_ptr + row)
    return greedy, scale, threshold


@triton.jit
def _chunk_kernel(logits_ptr, temps_ptr, mask_ptr, mask_rows_ptr, thresholds_ptr,
                  part_max_ptr, part_mass_ptr, part_val_ptr, part_idx_ptr, vocab, stride_row, num_words, num_chunks,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, THRESHOLD: tl.constexpr):
    """Per (row, chunk): the largest z, the mass sum exp2(z - that), the largest logit and its first id."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    greedy, scale, threshold = _row_setup(temps_ptr, thresholds_ptr, row, THRESHOLD)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    mask_row, words_ptr = bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED)
    # per lane: a running max of z and the mass below it (rescaled as the max grows), the best logit
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_mass = tl.zeros([BLOCK], tl.float32)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    for start in tl.static_range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + tl.arange(0, BLOCK)
        x = _candidates(row_ptr, words_ptr, mask_row, idx, vocab, threshold, MASKED, THRESHOLD)
        z = _scaled(x, scale)
        new_max = tl.maximum(lane_max, z)
        base = _finite(new_max)
        lane_mass = lane_mass * tl.exp2(lane_max - base) + tl.exp2(z - base)
        lane_max = new_max
        take = x > best_val   # strict: a lane keeps its first maximum
        best_val = tl.where(take, x, best_val)
        best_idx = tl.where(take, idx, best_idx)
    top = tl.max(lane_max, 0)
    mass = tl.sum(lane_mass * tl.exp2(lane_max - _finite(top)), 0)
    best = tl.max(best_val, 0)
    first = tl.min(tl.where(best_val == best, best_idx, 2147483647), 0)
    out = row * num_chunks + chunk
    tl.store(part_max_ptr + out, top)
    tl.store(part_mass_ptr + out, mass)
    tl.store(part_val_ptr + out, best)
    tl.store(part_idx_ptr + out, first)


@triton.jit
def uniform64(key):
    """U[0, 1) as float64 from the 53 high bits of two Philox words keyed by `key` (never 1)."""
    r0, r1, _, _ = tl.randint4x(key, tl.zeros([1], tl.int32))
    high = r0.to(tl.uint32, bitcast=True).to(tl.uint64)
    low = r1.to(tl.uint32, bitcast=True).to(tl.uint64)
    bits = (high << 21) | (low >> 11)
    return tl.sum(bits.to(tl.float64), 0) * 1.1102230246251565e-16   # 2^-53


@triton.jit
def _draw_kernel(logits_ptr, temps_ptr, keys_ptr, mask_ptr, mask_rows_ptr, thresholds_ptr,
                 part_max_ptr, part_mass_ptr, part_val_ptr, part_idx_ptr, out_ptr, vocab, stride_row, num_words,
                 num_chunks, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                 MASKED: tl.constexpr, THRESHOLD: tl.constexpr):
    row = tl.program_id(0)
    greedy, scale, threshold = _row_setup(temps_ptr, thresholds_ptr, row, THRESHOLD)
    chunks = tl.arange(0, BLOCK_C)
    parts = row * num_chunks + chunks
    in_row = chunks < num_chunks
    # NOTE: a name bound in both branches must keep its type and shape, hence the distinct names
    if greedy:
        part_val = tl.load(part_val_ptr + parts, mask=in_row, other=float("-inf"))
        part_idx = tl.load(part_idx_ptr + parts, mask=in_row, other=2147483647)
        token = tl.min(tl.where(part_val == tl.max(part_val, 0), part_idx, 2147483647), 0)
    else:
        part_max = tl.load(part_max_ptr + parts, mask=in_row, other=float("-inf"))
        part_mass = tl.load(part_mass_ptr + parts, mask=in_row, other=0.0)
        # each chunk's mass at the row's scale, summed in float64 in chunk order
        mass = (part_mass * tl.exp2(part_max - _finite(tl.max(part_max, 0)))).to(tl.float64)
        cum = tl.cumsum(mass, 0)
        total = tl.max(cum, 0)
        target = uniform64(tl.load(keys_ptr + row)) * total
        # the first chunk whose cumulative mass passes the target (rounding: the last with any)
        last = tl.max(tl.where(mass > 0.0, chunks, 0), 0)
        c = tl.minimum(tl.sum((cum <= target).to(tl.int32), 0), last)
        before = tl.sum(tl.where(chunks == c - 1, cum, 0.0), 0)
        this = chunks == c
        c_max = tl.max(tl.where(this, part_max, float("-inf")), 0)
        c_scale = tl.sum(tl.where(this, mass, 0.0), 0) / tl.sum(tl.where(this, part_mass, 0.0), 0)
        local = (target - before) / c_scale   # the target in the chunk's own units, exp2(z - c_max)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        mask_row, words_ptr = bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED)
        # the whole chunk in one load and one scan: a loop of smaller ones waited on a load and
        # four block-wide reductions per step, 256 rows on one program each
        idx = c * CHUNK + tl.arange(0, CHUNK)
        x = _candidates(row_ptr, words_ptr, mask_row, idx, vocab, threshold, MASKED, THRESHOLD)
        w = tl.exp2(_scaled(x, scale) - c_max)
        cum_w = tl.cumsum(w.to(tl.float64), 0)
        token = tl.min(tl.where(cum_w > local, idx, 2147483647), 0)
        last_id = tl.max(tl.where(w > 0.0, idx, 0), 0)
        token = tl.where(token == 2147483647, last_id, token)   # rounding left the target past the chunk
    # NOTE: an all -inf row (the engine never sends one) gives id 0
    tl.store(out_ptr + row, tl.where(token == 2147483647, 0, token).to(tl.int64))


def draw_tokens(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
                bitmask: torch.Tensor | None = None, mask_rows: torch.Tensor | None = None,
                thresholds: torch.Tensor | None = None, chunk: int = CHUNK, block: int = BLOCK) -> torch.Tensor:
    """[num_rows] int64 token ids: a draw from softmax(logits / T) per row, argmax where T = 0,
    over the ids its bitmask row allows, if any, and whose logit reaches its threshold, if any.
    (`chunk`, `block`: powers of two, block <= chunk; smaller ones let tests cross chunks cheaply.)"""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    temperatures, keys = temperatures.contiguous(), keys.contiguous()   # read as flat arrays
    num_chunks = triton.cdiv(vocab, chunk)
    parts = [torch.empty(num_rows, num_chunks, dtype=dtype, device=logits.device)
             for dtype in (torch.float32, torch.float32, torch.float32, torch.int32)]  # max, mass, val, idx
    masked = bitmask is not None
    bitmask = bitmask.contiguous() if masked else None
    inputs = (logits, temperatures, bitmask if masked else keys, mask_rows if masked else keys,
              keys if thresholds is None else thresholds.contiguous())
    flags = dict(CHUNK=chunk, MASKED=masked, THRESHOLD=thresholds is not None)
    num_words = bitmask.shape[1] if masked else 0
    _chunk_kernel[(num_rows, num_chunks)](*inputs, *parts, vocab, logits.stride(0), num_words, num_chunks,
                                          BLOCK=block, **flags, num_warps=4)
    _draw_kernel[(num_rows,)](logits, temperatures, keys, *inputs[2:], *parts, out, vocab, logits.stride(0),
                              num_words, num_chunks, BLOCK_C=max(16, triton.next_power_of_2(num_chunks)),
                              **flags, num_warps=16)
    return out
