"""Top-k, top-p and min-p as one logit threshold per row (Triton), so the sampler
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
(or sums the mass of) the ids at or above 16 candidate keys at once and narrows the range
16-fold, so 8 passes pin a float32 key exactly, 4 a bfloat16 one (its low 16 bits are 0).
A pass is one launch over (row, program) pairs, a program per 8,192 ids of the row (19 for
Qwen3's vocabulary): each writes its share's 16 sums, and every program of the next pass first
narrows its row's range from them (summed over the programs in a fixed order, so a row's
threshold never depends on the batch). Top-p's first pass after top-k also gives the mass
it needs: its lowest candidate is the top-k floor.

Most ids lie far below a top-k or top-p threshold, and a pass skips them by tiles of 128 ids.
A first kernel takes each tile's largest logit (and, for top-p, its mass); a per-row kernel
then bounds the search from below with them: the k-th largest tile maximum is at most the k-th
largest logit, and the largest tile maximum whose tile maxima at or above it already hold p of
the mass is at most top-p's crossing. The passes then read only the tiles whose maximum reaches
that bound, listed once per row (a model's peaked rows: a few dozen of 1,187 tiles; a flat
row, as a random-weight model's, keeps them all and costs what a pass over the row does).
NOTE: a pass over all its tiles is bound by its arithmetic, 16 compare-and-adds an id, not by
the logits' bytes (an H100 at 256 flat rows: ~0.24 ms a bfloat16 pass).

  logits:       [num_rows, vocab] any float dtype (not modified)
  temperatures: [num_rows] float32, 0 = greedy (no threshold: -inf)
  top_k:        [num_rows] int64, 0 = off; top_p: [num_rows] float32, 1 = off;
  min_p:        [num_rows] float32, 0 = off; each may be None (off for every row)
  bitmask / mask_rows: as `draw_tokens` (the grammar's allowed ids)
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.sampling import LOG2E, bitmask_row, masked_logits

TILE = 128         # ids a pass skips or reads as one: the tile maxima bound the search
CHUNK = 8192       # ids per program of the tile-maximum kernel
BLOCK = 512        # ids per step of a pass (BLOCK // TILE tiles; [BLOCK, CANDIDATES] sums in registers)
CANDIDATES = 16    # keys tested per pass (15 cut points and the range's start): 4 bits a pass


@triton.jit
def _order_key(x):
    """float32 -> int32 in the same order (negative floats: their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _from_key(key, lowest, SHIFT: tl.constexpr):
    """The float32 whose order key (>> SHIFT) is `key`; -inf for `lowest` (below every logit)."""
    bits = (key << SHIFT).to(tl.int32)
    x = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)
    return tl.where(key > lowest, x, float("-inf"))


@triton.jit
def _lowest_key(SHIFT: tl.constexpr):
    """-2^31 >> SHIFT, as int64: below every real logit's key (keys, >> SHIFT, are int64 here)."""
    return tl.full([], -2147483648, tl.int64) >> SHIFT


@triton.jit
def _candidates(lo, hi, CANDIDATES: tl.constexpr):
    """A range's candidate keys lo, lo + size, ... (size >= 1, so they cover [lo, hi]) and size."""
    size = (hi - lo + CANDIDATES) // CANDIDATES
    return lo + tl.arange(0, CANDIDATES).to(tl.int64) * size, size


@triton.jit
def _narrow(lo, hi, sums, target, CANDIDATES: tl.constexpr):
    """The range after a pass with these sums at its candidates: the largest candidate whose sum
    still reaches the target opens it. Needs sum(lo) >= target and sum(hi + 1) < target."""
    cand, size = _candidates(lo, hi, CANDIDATES)
    best = tl.max(tl.where((sums >= target) & (cand <= hi), cand, lo), 0)
    return best, tl.minimum(best + size - 1, hi)


@triton.jit
def _scale(temp):
    """log2(e) / T, so a weight is exp2((x - max) * scale) (greedy rows: T taken as 1)."""
    return LOG2E / tl.where(temp > 0.0, temp, 1.0)


@triton.jit
def _top_p_alone(top_k_ptr, top_p_ptr, row, TOP_K: tl.constexpr):
    """Whether the row filters by top-p without top-k (its bound and target need the tile masses)."""
    alone = tl.load(top_p_ptr + row) < 1.0
    if TOP_K:
        alone = alone & (tl.load(top_k_ptr + row) == 0)
    return alone


@triton.jit
def _weights(x, row_max, scale):
    """exp2((x - max) log2(e) / T): an id's mass relative to the largest logit (-inf: none)."""
    ref = tl.where(row_max > float("-inf"), row_max, 0.0)   # all -inf: no inf - inf
    return tl.where(x > float("-inf"), tl.exp2((x - ref) * scale), 0.0)


@triton.jit
def _tile_kernel(logits_ptr, temps_ptr, top_k_ptr, top_p_ptr, mask_ptr, mask_rows_ptr, tile_max_ptr, tile_mass_ptr,
                 vocab, stride_row, num_words, num_tiles, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                 MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Each tile's largest logit and, in rows with top-p but no top-k, its mass relative to that
    maximum (top-p's bound and target; after top-k, top-p needs neither). Without top-k and
    top-p (min-p alone: the row's max is all it needs) a tile is the whole chunk."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    mask_row, words_ptr = bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED)
    if TOP_K or TOP_P:
        scale = _scale(tl.load(temps_ptr + row))
        mass = False
        if TOP_P:
            mass = _top_p_alone(top_k_ptr, top_p_ptr, row, TOP_K)
        for start in tl.static_range(0, CHUNK, BLOCK):
            tile = (chunk * CHUNK + start) // TILE + tl.arange(0, BLOCK // TILE)   # [BLOCK // TILE]
            idx = tile[:, None] * TILE + tl.arange(0, TILE)[None, :]
            x = masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED)
            top = tl.max(x, 1)
            out = row * num_tiles + tile
            tl.store(tile_max_ptr + out, top, mask=tile < num_tiles)
            if mass:
                tl.store(tile_mass_ptr + out, tl.sum(_weights(x, top[:, None], scale), 1), mask=tile < num_tiles)
    else:  # NOTE: a max per lane, reduced once: a reduction per tile costs barriers
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in tl.static_range(0, CHUNK, BLOCK):
            idx = chunk * CHUNK + start + tl.arange(0, BLOCK)
            lane_max = tl.maximum(lane_max, masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED))
        tl.store(tile_max_ptr + row * num_tiles + chunk, tl.max(lane_max, 0))


@triton.jit
def _bounds_kernel(temps_ptr, top_k_ptr, top_p_ptr, tile_max_ptr, tile_mass_ptr, row_stats_ptr, tiles_ptr,
                   bound_ptr, num_tiles, SHIFT: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, CANDIDATES: tl.constexpr):
    """A row's max and total mass, its search's lower bound from the tile maxima, and the list of
    tiles whose maximum reaches it (the only ones a pass reads)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_T)
    tile_max = tl.load(tile_max_ptr + row * num_tiles + offs, mask=offs < num_tiles, other=float("-inf"))
    row_max = tl.max(tile_max, 0)
    tl.store(row_stats_ptr + row * 2, row_max)
    if TOP_K or TOP_P:
        temp = tl.load(temps_ptr + row)
        scale = _scale(temp)
        k = tl.zeros([], tl.int64)
        p = tl.full([], 1.0, tl.float32)
        if TOP_K:
            k = tl.load(top_k_ptr + row)
        alone = False   # top-p without top-k: the bound holds p of the mass, not k ids
        if TOP_P:
            p = tl.load(top_p_ptr + row)
            alone = _top_p_alone(top_k_ptr, top_p_ptr, row, TOP_K)
        target = k.to(tl.float32)
        if alone:
            tile_mass = tl.load(tile_mass_ptr + row * num_tiles + offs, mask=offs < num_tiles, other=0.0)
            total = tl.sum(tile_mass * _weights(tile_max, row_max, scale), 0)
            tl.store(row_stats_ptr + row * 2 + 1, total)
            target = p * total
        # The bound is the largest tile maximum t whose tiles at or above it count k ids (or hold
        # p of the mass): the k-th largest tile maximum is at most the k-th largest logit, and
        # so for the mass. Found as the passes find a threshold, 16 keys at a time (sorting the
        # tile maxima took 5x as long); no such t (fewer than k finite tiles): no bound.
        lowest = _lowest_key(SHIFT)
        lo = lowest
        hi = (_order_key(row_max) >> SHIFT).to(tl.int64)
        for _ in tl.static_range((32 - SHIFT) // 4):
            cand, _ = _candidates(lo, hi, CANDIDATES)
            cand32 = tl.minimum(cand, hi).to(tl.int32)
            sums = tl.zeros([CANDIDATES, BLOCK_S], tl.float32)
            for start in range(0, num_tiles, BLOCK_S):
                at = start + tl.arange(0, BLOCK_S)
                m = tl.load(tile_max_ptr + row * num_tiles + at, mask=at < num_tiles, other=float("-inf"))
                w = tl.where(m > float("-inf"), 1.0, 0.0)
                if alone:
                    w = _weights(m, row_max, scale)
                sums += tl.where((_order_key(m) >> SHIFT)[None, :] >= cand32[:, None], w[None, :], 0.0)
            lo, hi = _narrow(lo, hi, tl.sum(sums, 1), target, CANDIDATES)
        bound = _from_key(lo, lowest, SHIFT)
        active = (temp > 0.0) & (row_max > float("-inf")) & ((k > 0) | (p < 1.0))
        bound = tl.where(active, bound, float("inf"))   # a row no pass reads lists no tile
        listed = (tile_max >= bound) & (tile_max > float("-inf"))
        tl.store(tiles_ptr + row * num_tiles + tl.cumsum(listed.to(tl.int32), 0) - 1, offs, mask=listed)
        tl.store(bound_ptr + row * 2, lo)   # lowest: no bound
        tl.store(bound_ptr + row * 2 + 1, tl.sum(listed.to(tl.int64), 0))


@triton.jit
def _row(temps_ptr, top_k_ptr, top_p_ptr, row_stats_ptr, row, SHIFT: tl.constexpr, TOP_K: tl.constexpr,
         TOP_P: tl.constexpr):
    """A row's settings: (T, row max, log2(e) / T, lowest key, the max's key, k or 0, p or 1,
    whether it samples at all)."""
    temp = tl.load(temps_ptr + row)
    row_max = tl.load(row_stats_ptr + row * 2)
    scale = _scale(temp)
    lowest = _lowest_key(SHIFT)
    top = (_order_key(row_max) >> SHIFT).to(tl.int64)
    k = tl.zeros([], tl.int64)
    p = tl.full([], 1.0, tl.float32)
    if TOP_K:
        k = tl.load(top_k_ptr + row)
    if TOP_P:
        p = tl.load(top_p_ptr + row)
    sampled = (temp > 0.0) & (row_max > float("-inf"))  # greedy rows take the argmax: no threshold
    return temp, row_max, scale, lowest, top, k, p, sampled


@triton.jit
def _sums(partials_ptr, step, row, num_rows, num_programs, BLOCK_C: tl.constexpr, CANDIDATES: tl.constexpr):
    """[CANDIDATES]: pass `step`'s sums for the row, over its programs in a fixed order."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, CANDIDATES)
    base = (step * num_rows + row).to(tl.int64) * num_programs
    part = tl.load(partials_ptr + (base + offs_c[:, None]) * CANDIDATES + offs_k[None, :],
                   mask=offs_c[:, None] < num_programs, other=0.0)
    return tl.sum(part, 0)


@triton.jit
def _narrowed(partials_ptr, state_ptr, step, target, row, num_rows, num_programs,
              BLOCK_C: tl.constexpr, CANDIDATES: tl.constexpr):
    """The range after pass `step` (`_narrow` with the sums its programs wrote)."""
    lo = tl.load(state_ptr + (step * num_rows + row) * 2)
    hi = tl.load(state_ptr + (step * num_rows + row) * 2 + 1)
    return _narrow(lo, hi, _sums(partials_ptr, step, row, num_rows, num_programs, BLOCK_C, CANDIDATES), target,
                   CANDIDATES)


@triton.jit
def _top_p_target(partials_ptr, row_stats_ptr, first_p, k, p, row, num_rows, num_programs, BLOCK_C: tl.constexpr,
                  CANDIDATES: tl.constexpr):
    """p times the mass top-k left: top-p's first pass summed it at its lowest candidate, the
    top-k floor; without top-k, the row's total mass."""
    if k > 0:
        kept = tl.sum(tl.where(tl.arange(0, CANDIDATES) == 0,
                               _sums(partials_ptr, first_p, row, num_rows, num_programs, BLOCK_C, CANDIDATES), 0.0), 0)
    else:
        kept = tl.load(row_stats_ptr + row * 2 + 1)
    return p * kept


@triton.jit
def _pass_kernel(logits_ptr, temps_ptr, top_k_ptr, top_p_ptr, mask_ptr, mask_rows_ptr, row_stats_ptr, tiles_ptr,
                 bound_ptr, partials_ptr, state_ptr, vocab, stride_row, num_words, num_rows, num_tiles, num_programs,
                 step, first_p, MASS: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MASKED: tl.constexpr,
                 SHIFT: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr,
                 CANDIDATES: tl.constexpr, MIN_SHARE: tl.constexpr):
    """Pass `step` of a search (top-k's count: MASS False; top-p's mass: MASS True, from step
    first_p): the range from the pass before, then the sums at its candidates over this
    program's share of the row's listed tiles."""
    row = tl.program_id(0)
    program = tl.program_id(1)
    temp, row_max, scale, lowest, top, k, p, sampled = _row(temps_ptr, top_k_ptr, top_p_ptr, row_stats_ptr, row,
                                                            SHIFT, TOP_K, TOP_P)
    active = sampled & (k > 0)
    if MASS:
        active = sampled & (p < 1.0)
    if active:
        # a program reads at least MIN_SHARE tiles (a quarter chunk): a row's few dozen listed tiles
        # go to a few programs, and the rest skip the range narrowing too. Program 0 always reads
        # (the row max's tile is listed) and keeps the range for the next pass. H100, 256 rows,
        # top-k 50: the 4 passes take 103 us, against 157 us with the tiles spread over 19 programs
        num_listed = tl.load(bound_ptr + row * 2 + 1).to(tl.int32)
        share = tl.maximum(tl.cdiv(num_listed, num_programs), MIN_SHARE)
        begin = program * share
        end = tl.minimum(begin + share, num_listed)
        sums = tl.zeros([CANDIDATES], tl.float32)
        if begin < end:
            first = 0
            target = k.to(tl.float32)
            if MASS:
                first = first_p
            if step == first:  # a search's first pass: the whole range above its lower bound
                lo = tl.load(bound_ptr + row * 2)
                if MASS and TOP_K:
                    if k > 0:   # the top-k search's last pass narrows to its floor
                        lo, _ = _narrowed(partials_ptr, state_ptr, step - 1, k.to(tl.float32), row, num_rows,
                                          num_programs, BLOCK_C, CANDIDATES)
                hi = top
            else:
                if MASS:
                    target = _top_p_target(partials_ptr, row_stats_ptr, first_p, k, p, row, num_rows, num_programs,
                                           BLOCK_C, CANDIDATES)
                lo, hi = _narrowed(partials_ptr, state_ptr, step - 1, target, row, num_rows, num_programs,
                                   BLOCK_C, CANDIDATES)
            if program == 0:  # the range every program of this pass computed, for the next one
                tl.store(state_ptr + (step * num_rows + row) * 2, lo)
                tl.store(state_ptr + (step * num_rows + row) * 2 + 1, hi)
            cand, _ = _candidates(lo, hi, CANDIDATES)
            # compared as int32 (one instruction, not int64's two): keys >> SHIFT fit, and a candidate
            # past hi, whose sum `_narrowed` ignores, may be clamped. Every candidate is >= lo, which
            # never falls below the search's bound, so ids under it (and tiles not listed) add to no sum.
            cand32 = tl.minimum(cand, hi).to(tl.int32)
            row_ptr = logits_ptr + row.to(tl.int64) * stride_row
            mask_row, words_ptr = bitmask_row(mask_ptr, mask_rows_ptr, row, num_words, MASKED)
            # NOTE: summed per lane and reduced once: a reduction per block costs barriers. Candidates
            # by ids, not ids by candidates: each thread then holds all 16 sums of its ids, in the
            # layout the ids were loaded in; the other way round, Triton spread the candidates over
            # threads and passed every key through shared memory (a loop of 365 sm_90 instructions
            # a thread, against 214; H100, 256 flat rows, top-p: 4 passes 1.45 -> 0.97 ms)
            total = tl.zeros([CANDIDATES, BLOCK], tl.float32)
            for start in range(begin, end, BLOCK // TILE):
                at = start + tl.arange(0, BLOCK // TILE)
                tile = tl.load(tiles_ptr + row * num_tiles + at, mask=at < end, other=num_tiles)  # past the row: -inf
                idx = tl.reshape(tile[:, None] * TILE + tl.arange(0, TILE)[None, :], [BLOCK])
                x = masked_logits(row_ptr, words_ptr, mask_row, idx, vocab, MASKED)
                key = _order_key(x) >> SHIFT
                if MASS:
                    w = _weights(x, row_max, scale)
                else:
                    w = tl.where(x > float("-inf"), 1.0, 0.0)
                total += tl.where(key[None, :] >= cand32[:, None], w[None, :], 0.0)
            sums = tl.sum(total, 1)
        out = ((step * num_rows + row).to(tl.int64) * num_programs + program) * CANDIDATES
        tl.store(partials_ptr + out + tl.arange(0, CANDIDATES), sums)


@triton.jit
def _threshold_kernel(temps_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row_stats_ptr, partials_ptr, state_ptr, out_ptr,
                      num_rows, num_programs, last_k, first_p, last_p,
                      TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, SHIFT: tl.constexpr,
                      BLOCK_C: tl.constexpr, CANDIDATES: tl.constexpr):
    """Each row's threshold from the last pass of each search, and min-p's."""
    row = tl.program_id(0)
    temp, row_max, scale, lowest, top, k, p, sampled = _row(temps_ptr, top_k_ptr, top_p_ptr, row_stats_ptr, row,
                                                            SHIFT, TOP_K, TOP_P)
    threshold = tl.full([], float("-inf"), tl.float32)
    if TOP_K:
        if (k > 0) & sampled:
            floor_key, _ = _narrowed(partials_ptr, state_ptr, last_k, k.to(tl.float32), row, num_rows, num_programs,
                                     BLOCK_C, CANDIDATES)
            threshold = _from_key(floor_key, lowest, SHIFT)
    if TOP_P:
        if (p < 1.0) & sampled:
            target = _top_p_target(partials_ptr, row_stats_ptr, first_p, k, p, row, num_rows, num_programs,
                                   BLOCK_C, CANDIDATES)
            crossing, _ = _narrowed(partials_ptr, state_ptr, last_p, target, row, num_rows, num_programs,
                                    BLOCK_C, CANDIDATES)
            threshold = tl.maximum(threshold, _from_key(crossing, lowest, SHIFT))
    if MIN_P:
        min_p = tl.load(min_p_ptr + row)
        if (min_p > 0.0) & sampled:
            threshold = tl.maximum(threshold, row_max + temp * tl.log(min_p))
    tl.store(out_ptr + row, threshold)


def _key_shift(dtype: torch.dtype) -> int:
    """Low key bits every logit leaves zero: bfloat16 widens to float32 with 16 of them, so its
    keys differ in the high 16 alone (4 passes pin one, not 8)."""
    return 16 if dtype == torch.bfloat16 else 0


def _pointers(temps: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
              bitmask: torch.Tensor | None, mask_rows: torch.Tensor | None) -> tuple:
    """(top_k, top_p, (bitmask, mask_rows)) as the kernels take them: temps stands in for the
    absent ones (a placeholder pointer, never read)."""
    return (temps if top_k is None else top_k, temps if top_p is None else top_p,
            (temps, temps) if bitmask is None else (bitmask, mask_rows))


def tile_bounds(logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                bitmask: torch.Tensor | None, mask_rows: torch.Tensor | None, chunk: int, block: int,
                tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's (max, total mass) [rows, 2] float32; its search's lower bound key and how many
    tiles reach it [rows, 2] int64; those tiles' indices [rows, num_tiles] int32 (the first
    count of them). Without top-k and top-p, the row's max alone."""
    num_rows, vocab = logits.shape
    num_tiles = triton.cdiv(vocab, tile)
    k_ptr, p_ptr, mask = _pointers(temps, top_k, top_p, bitmask, mask_rows)
    tile_max = torch.empty(num_rows, num_tiles, dtype=torch.float32, device=logits.device)
    tile_mass = torch.empty_like(tile_max) if top_p is not None else tile_max   # top-p's alone
    row_stats = torch.empty(num_rows, 2, dtype=torch.float32, device=logits.device)
    tiles = torch.empty(num_rows, num_tiles, dtype=torch.int32, device=logits.device)
    bound = torch.empty(num_rows, 2, dtype=torch.int64, device=logits.device)
    flags = dict(TOP_K=top_k is not None, TOP_P=top_p is not None)
    _tile_kernel[(num_rows, triton.cdiv(vocab, chunk))](
        logits, temps, k_ptr, p_ptr, *mask, tile_max, tile_mass, vocab, logits.stride(0),
        0 if bitmask is None else bitmask.shape[1], num_tiles, **flags, MASKED=bitmask is not None,
        CHUNK=chunk, BLOCK=block, TILE=tile, num_warps=4)
    _bounds_kernel[(num_rows,)](temps, k_ptr, p_ptr, tile_max, tile_mass, row_stats, tiles, bound, num_tiles,
                                SHIFT=_key_shift(logits.dtype), **flags,
                                BLOCK_T=max(16, triton.next_power_of_2(num_tiles)), BLOCK_S=256,
                                CANDIDATES=CANDIDATES, num_warps=4)
    return row_stats, bound, tiles


def sampling_thresholds(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor | None,
                        top_p: torch.Tensor | None, min_p: torch.Tensor | None, bitmask: torch.Tensor | None = None,
                        mask_rows: torch.Tensor | None = None, chunk: int = CHUNK, block: int = BLOCK,
                        tile: int = TILE) -> torch.Tensor:
    """[num_rows] float32: each row keeps the ids with logit >= its threshold (-inf: all).
    (`chunk`, `block`, `tile`: powers of two, tile <= block <= chunk; smaller ones let tests
    cross borders cheaply.)"""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    shift = _key_shift(logits.dtype)
    passes = (32 - shift) // 4
    num_k, num_p = passes * (top_k is not None), passes * (top_p is not None)
    masked = bitmask is not None
    temps = temperatures.contiguous()
    top_k, top_p, min_p, bitmask = (None if t is None else t.contiguous() for t in (top_k, top_p, min_p, bitmask))
    if top_k is None and top_p is None:
        tile = chunk   # min-p alone: no search, and the row's max needs no finer tiles
    row_stats, bound, tiles = tile_bounds(logits, temps, top_k, top_p, bitmask, mask_rows, chunk, block, tile)
    k_ptr, p_ptr, mask = _pointers(temps, top_k, top_p, bitmask, mask_rows)
    num_words = bitmask.shape[1] if masked else 0
    num_programs = triton.cdiv(vocab, chunk)   # a pass's programs per row: its tiles shared among them
    partials = torch.empty(max(num_k + num_p, 1), num_rows, num_programs, CANDIDATES, dtype=torch.float32,
                           device=logits.device)
    state = torch.empty(max(num_k + num_p, 1), num_rows, 2, dtype=torch.int64, device=logits.device)  # ranges
    flags = dict(TOP_K=top_k is not None, TOP_P=top_p is not None, SHIFT=shift,
                 BLOCK_C=max(16, triton.next_power_of_2(num_programs)), CANDIDATES=CANDIDATES)
    for step in range(num_k + num_p):
        _pass_kernel[(num_rows, num_programs)](
            logits, temps, k_ptr, p_ptr, *mask, row_stats, tiles, bound, partials, state, vocab, logits.stride(0),
            num_words, num_rows, tiles.shape[1], num_programs, step, num_k, MASS=step >= num_k, MASKED=masked,
            BLOCK=block, TILE=tile, MIN_SHARE=max(1, chunk // tile // 4), **flags, num_warps=8)
    _threshold_kernel[(num_rows,)](
        temps, k_ptr, p_ptr, temps if min_p is None else min_p, row_stats, partials, state, out,
        num_rows, num_programs, num_k - 1, num_k, num_k + num_p - 1, MIN_P=min_p is not None, **flags, num_warps=1)
    return out
