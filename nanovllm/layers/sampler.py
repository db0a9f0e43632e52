"""Token sampling for a batch of rows with mixed per-row settings, in one vectorized pass.

The stages, each skipped when no row needs it (decided from host-side fields, so the
sampler never waits on the device to choose): log-probabilities of the raw logits ->
penalties -> the min_tokens ban -> the grammar mask (structured outputs) -> greedy argmax
-> temperature -> top-k / top-p -> min-p -> one draw per row. Greedy rows (temperature 0)
take the argmax.

A draw is an exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p
(p need not be normalized), so sampling needs no cumulative sum or sort over the
vocabulary; only top-p sorts. Rows with a seed draw E from their own generator, seeded
by (request seed, output position), so their tokens do not depend on the batch.

On CUDA one read of the logits draws by inverse CDF instead (`kernels/sampling.py`): the
same distribution, its uniform from Philox keyed per row (a seeded row's key is its
generator seed above); the grammar bitmask is applied as it reads, and top-k / top-p /
min-p as one logit threshold per row found without a sort
(`kernels/sampling_thresholds.py`; ids tied with the last one kept are all kept).
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from nanovllm.kernels import fused_kernels_enabled
from nanovllm.layers.grammar_mask import GrammarMask, apply_grammar_mask

MASK64 = (1 << 64) - 1
# smallest exponential noise: keeps p / E finite, and 0 / E = 0 for masked tokens
MIN_NOISE = 1e-20


@dataclass(frozen=True)
class PenaltyTensors:
    """Penalty settings and token histories of the rows, histories as flat (row, token) pairs.

    Rows without a penalty have the neutral values and no pairs."""
    repetition: torch.Tensor        # [num_rows] float32; 1 = off
    frequency: torch.Tensor         # [num_rows] float32; 0 = off
    presence: torch.Tensor          # [num_rows] float32; 0 = off
    prompt_rows: torch.Tensor       # [num_prompt_pairs] int64 } prompt tokens of the rows with a
    prompt_token_ids: torch.Tensor  # [num_prompt_pairs] int64 } repetition penalty
    output_rows: torch.Tensor       # [num_output_pairs] int64 } output tokens (with repeats) of
    output_token_ids: torch.Tensor  # [num_output_pairs] int64 } the rows with any penalty


@dataclass(frozen=True)
class SamplingTensors:
    """One step's sampling settings; row i goes with logits row i.

    Tensor fields may be on the host or the device. The other fields are host values."""
    temperatures: torch.Tensor              # [num_rows] float32; 0 = greedy
    top_k: torch.Tensor | None              # [num_rows] int64; 0 = off. None: no row uses top-k
    top_p: torch.Tensor | None              # [num_rows] float32; 1 = off. None: no row uses top-p
    min_p: torch.Tensor | None              # [num_rows] float32; 0 = off. None: no row uses min-p
    penalties: PenaltyTensors | None        # None: no row has a penalty
    banned_rows: torch.Tensor | None        # [num_banned] int64 } logits[row, token] = -inf: EOS and
    banned_token_ids: torch.Tensor | None   # [num_banned] int64 } stop ids before min_tokens
    logprob_rows: torch.Tensor | None       # [num_logprob_rows] int64: rows that want logprobs
    num_logprobs: tuple[int, ...]           # per row: how many top alternatives (-1 = no logprobs)
    max_top_k: int                          # the largest active top_k (0: none)
    seeded_rows: tuple[int, ...]            # rows drawing from their own generator,
    row_seeds: tuple[int, ...]              # seeded with these (see `row_seed`)
    all_greedy: bool
    any_greedy: bool                        # some row has temperature 0

    @property
    def max_num_logprobs(self) -> int:
        return max(self.num_logprobs, default=-1)


class LogprobsTensors(NamedTuple):
    sampled: torch.Tensor      # [num_logprob_rows] float32: log p of the sampled token
    top_ids: torch.Tensor      # [num_logprob_rows, max_num_logprobs] int64, most likely first
    top_values: torch.Tensor   # [num_logprob_rows, max_num_logprobs] float32


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor            # [num_rows] int64
    logprobs: LogprobsTensors | None   # None: no row asked


def row_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw for output token `position`.

    A function of the request alone (splitmix64 of seed and position), so its draws never
    depend on what else is in the batch, nor on how often it was preempted."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def apply_penalties(logits: torch.Tensor, p: PenaltyTensors) -> None:
    """In place. HF's repetition penalty over prompt + output tokens (divide a positive
    logit by it, multiply a negative one), then OpenAI's frequency (per occurrence) and
    presence (once) penalties over the output tokens."""
    counts = torch.zeros_like(logits)  # [num_rows, vocab] float32: occurrences in the output
    ones = torch.ones_like(p.output_token_ids, dtype=logits.dtype)
    counts.index_put_((p.output_rows, p.output_token_ids), ones, accumulate=True)
    present = counts > 0
    seen = present.clone()
    seen[p.prompt_rows, p.prompt_token_ids] = True
    rep = p.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits))
    logits.sub_(p.frequency.unsqueeze(1) * counts)
    logits.sub_(p.presence.unsqueeze(1) * present)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """In place, without sorting the vocabulary: keep exactly the top_k[i] largest logits
    of row i (ties broken as torch.topk does); rows with top_k 0 are untouched."""
    k = min(max_top_k, logits.shape[1])
    _, indices = logits.topk(k, dim=-1)                                   # [num_rows, k]
    ranks = torch.arange(k, device=logits.device)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(1, indices, ranks < top_k.unsqueeze(1))
    keep |= (top_k == 0).unsqueeze(1)
    logits.masked_fill_(~keep, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """In place, with one sort: top-k, then top-p over the top-k renormalized distribution.

    NOTE: the token that crosses p is kept (a token goes when the mass of the tokens
    before it already reaches p), so at least one token always survives."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)           # [num_rows, vocab]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab)
        ranks = torch.arange(vocab, device=logits.device)
        sorted_logits.masked_fill_(ranks >= k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # rows with top_p 1 are left alone: cumsum rounding must not clip their tail
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop[:, 0] = False  # NOTE: also when top_p rounds to 0 in float32 (a top_p below ~1e-45)
    sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: zero the probabilities below min_p times the row's largest. The race
    needs no renormalization after."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    probs.masked_fill_(probs < threshold, 0.0)


def gather_logprobs(raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor,
                    params: SamplingTensors) -> LogprobsTensors | None:
    if raw_logprobs is None:
        return None
    sampled = raw_logprobs.gather(1, token_ids[params.logprob_rows].unsqueeze(1)).squeeze(1)
    top_values, top_ids = raw_logprobs.topk(params.max_num_logprobs, dim=-1)
    return LogprobsTensors(sampled, top_ids, top_values)


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self._row_generators: dict[torch.device, torch.Generator] = {}  # reseeded for every seeded row

    @torch.inference_mode()
    def forward(self, logits: torch.Tensor, params: SamplingTensors,
                generator: torch.Generator | None = None, grammar: GrammarMask | None = None) -> SamplerOutput:
        """logits [num_rows, vocab], any float dtype (not modified). `generator` draws the
        noise of the unseeded rows; `grammar` limits the constrained rows' tokens."""
        one_pass = logits.is_cuda and fused_kernels_enabled(logits)
        raw_logprobs = None
        if params.logprob_rows is not None:  # NOTE: from the unmodified distribution
            raw_logprobs = torch.log_softmax(logits[params.logprob_rows].float(), dim=-1)
        if not one_pass or params.penalties is not None or params.banned_rows is not None:
            logits = logits.to(torch.float32, copy=True)  # [num_rows, vocab]: ours to edit in place
            if params.penalties is not None:
                apply_penalties(logits, params.penalties)
            if params.banned_rows is not None:
                logits[params.banned_rows, params.banned_token_ids] = float("-inf")
        if grammar is not None and not one_pass:  # NOTE: the engine never leaves a row with no token allowed
            apply_grammar_mask(logits, grammar)
        if params.all_greedy and (grammar is None or not one_pass):
            token_ids = logits.argmax(dim=-1)
        elif one_pass:  # the one-pass kernel applies the grammar's bitmask as it reads the logits
            from nanovllm.kernels.sampling import draw_tokens
            keys = self._row_keys(params, len(logits), generator)
            mask = {} if grammar is None else dict(bitmask=grammar.bitmask, mask_rows=grammar.row_index(len(logits)))
            thresholds = None
            if params.top_k is not None or params.top_p is not None or params.min_p is not None:
                from nanovllm.kernels.sampling_thresholds import sampling_thresholds
                thresholds = sampling_thresholds(logits, params.temperatures, params.top_k, params.top_p,
                                                 params.min_p, **mask)
            token_ids = draw_tokens(logits, params.temperatures, keys, thresholds=thresholds, **mask)
        elif params.any_greedy:
            greedy = logits.argmax(dim=-1)  # before _sample edits the logits in place
            token_ids = torch.where(params.temperatures > 0, self._sample(logits, params, generator), greedy)
        else:  # NOTE: the common batch job: one temperature > 0 for all, no greedy argmax to take
            token_ids = self._sample(logits, params, generator)
        return SamplerOutput(token_ids, gather_logprobs(raw_logprobs, token_ids, params))

    def _row_keys(self, params: SamplingTensors, num_rows: int, generator: torch.Generator | None) -> torch.Tensor:
        """[num_rows] int64 Philox keys of the one-pass draw: fresh from `generator` each step,
        a seeded row's from its (seed, position) alone."""
        device = params.temperatures.device
        keys = torch.randint(-2**63, 2**63 - 1, (num_rows,), generator=generator, device=device)
        if params.seeded_rows:
            seeds = [s - 2**64 if s >= 2**63 else s for s in params.row_seeds]  # as int64
            keys[torch.tensor(params.seeded_rows, device=device)] = torch.tensor(seeds, device=device)
        return keys

    def _sample(self, logits: torch.Tensor, params: SamplingTensors,
                generator: torch.Generator | None) -> torch.Tensor:
        t = params.temperatures
        logits.div_(torch.where(t > 0, t, 1.0).unsqueeze(1) if params.any_greedy else t.unsqueeze(1))
        if params.top_p is not None:
            apply_top_k_top_p(logits, params.top_k, params.top_p)
        elif params.top_k is not None:
            apply_top_k(logits, params.top_k, params.max_top_k)
        probs = logits.softmax(dim=-1)
        if params.min_p is not None:
            apply_min_p(probs, params.min_p)
        return self._race(probs, params, generator)

    def _race(self, probs: torch.Tensor, params: SamplingTensors,
              generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=generator)    # [num_rows, vocab]
        if params.seeded_rows:
            row_generator = self._row_generator(probs.device)
            for row, seed in zip(params.seeded_rows, params.row_seeds):
                noise[row].exponential_(generator=row_generator.manual_seed(seed))
        return probs.div_(noise.clamp_min_(MIN_NOISE)).argmax(dim=-1)

    def _row_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._row_generators:
            self._row_generators[device] = torch.Generator(device=device)
        return self._row_generators[device]
