"""The sampler's boundary on the engine side: per-step `SamplingTensors` built from the
sampling sequences, and the sampler's output brought back to the host per sequence."""
import itertools
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import PenaltyTensors, SamplerOutput, SamplingTensors, row_seed
from nanovllm.sampling_params import SamplingParams


class TokenLogprobs(NamedTuple):
    logprob: float                   # of the sampled token, under log_softmax of the raw logits
    top_logprobs: dict[int, float]   # the k most likely tokens, most likely first


class StepOutput(NamedTuple):
    """What one step sampled (rank 0; empty elsewhere)."""
    sampled: dict[int, int]                  # seq_id -> token id
    logprobs: dict[int, TokenLogprobs]       # seq_id -> logprobs, for the sequences that asked

    @classmethod
    def empty(cls) -> "StepOutput":
        return cls({}, {})


def _int64(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def _pairs(rows: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, token) pairs: rows[j] repeated once per token of tokens[j]."""
    lengths = [len(t) for t in tokens]
    flat = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=sum(lengths))
    return torch.from_numpy(np.repeat(np.asarray(rows, dtype=np.int64), lengths)), torch.from_numpy(flat)


def _column(params: list[SamplingParams], distinct: list[SamplingParams], name: str,
            dtype: torch.dtype) -> torch.Tensor:
    """[num_rows] tensor of one field; a fill when every row shares one settings object."""
    # NOTE: float() first: an int field value past int64 (temperature=2**70, a valid float32) overflows torch
    cast = float if dtype.is_floating_point else int
    if len(distinct) == 1:
        return torch.full((len(params),), cast(getattr(distinct[0], name)), dtype=dtype)
    return torch.tensor([cast(getattr(p, name)) for p in params], dtype=dtype)


def _penalties(seqs: list[Sequence], params: list[SamplingParams], distinct: list[SamplingParams]
               ) -> PenaltyTensors | None:
    if not any(p.has_penalties for p in distinct):
        return None
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    rep_rows = [i for i in rows if params[i].repetition_penalty != 1]
    prompt_rows, prompt_ids = _pairs(rep_rows, [seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in rep_rows])
    output_rows, output_ids = _pairs(rows, [seqs[i].completion_token_ids for i in rows])
    return PenaltyTensors(
        repetition=_column(params, distinct, "repetition_penalty", torch.float32),
        frequency=_column(params, distinct, "frequency_penalty", torch.float32),
        presence=_column(params, distinct, "presence_penalty", torch.float32),
        prompt_rows=prompt_rows, prompt_token_ids=prompt_ids, output_rows=output_rows, output_token_ids=output_ids)


def _banned(seqs: list[Sequence], eos_token_ids: frozenset[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row, token) pairs that may not be sampled yet: the stop ids and EOS of the rows
    below their min_tokens (a grammar-constrained row's mask bans them instead)."""
    rows, ids = [], []
    for i, seq in enumerate(seqs):
        p = seq.sampling_params
        if _num_outputs(seq) < p.min_tokens and p.structured_outputs is None:
            rows.append(i)
            ids.append(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)))
    return _pairs(rows, ids) if rows else (None, None)


def _logprobs(params: list[SamplingParams], distinct: list[SamplingParams]
              ) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    if all(p.logprobs is None for p in distinct):
        return None, (-1,) * len(params)
    num_logprobs = tuple(-1 if p.logprobs is None else p.logprobs for p in params)
    return _int64([i for i, k in enumerate(num_logprobs) if k >= 0]), num_logprobs


def _num_outputs(seq: Sequence) -> int:
    """Output tokens before the one sampled now, pending ones included, so a row's
    settings do not depend on whether the previous step's ids reached the host yet."""
    return len(seq) - seq.num_prompt_tokens


def build_sampling_tensors(seqs: list[Sequence], eos_token_ids: frozenset[int]) -> SamplingTensors:
    """Host tensors for the sequences that sample this step, in logits-row order.

    Each stage's per-row work runs only when some request uses it, decided on the
    distinct sampler settings (usually one: requests of one job differ in max_tokens, if at
    all), so the common case costs a few fills per step."""
    params = [seq.sampling_params for seq in seqs]
    objects = {id(p): p for p in params}.values()  # NOTE: cheaper keys first; most jobs share one object
    distinct = list({p.sampler_settings: p for p in objects}.values())
    max_top_k = max((p.top_k for p in distinct), default=0)   # -1 and 0 both mean off
    logprob_rows, num_logprobs = _logprobs(params, distinct)
    banned_rows, banned_ids = (_banned(seqs, eos_token_ids) if any(p.min_tokens for p in distinct)
                               else (None, None))
    seeded = ([i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
              if any(p.seed is not None for p in distinct) else [])
    return SamplingTensors(
        temperatures=_column(params, distinct, "temperature", torch.float32),
        top_k=_column(params, distinct, "top_k", torch.int64).clamp_min_(0) if max_top_k > 0 else None,
        top_p=_column(params, distinct, "top_p", torch.float32) if any(p.top_p < 1 for p in distinct) else None,
        min_p=_column(params, distinct, "min_p", torch.float32) if any(p.min_p > 0 for p in distinct) else None,
        penalties=_penalties(seqs, params, distinct),
        banned_rows=banned_rows, banned_token_ids=banned_ids,
        logprob_rows=logprob_rows, num_logprobs=num_logprobs,
        max_top_k=max(max_top_k, 0),
        seeded_rows=tuple(seeded),
        row_seeds=tuple(row_seed(params[i].seed, _num_outputs(seqs[i])) for i in seeded),
        all_greedy=all(p.greedy for p in distinct),
        any_greedy=any(p.greedy for p in distinct),
    )


CHECK_SECONDS = 0.1


class PendingOutput:
    """A step's sampler output on its way to the host: the device-to-host copies are
    queued behind the step, and `result()` waits for them, so the host can prepare the
    next step meanwhile."""

    def __init__(self, seq_ids: list[int], out: SamplerOutput | None, params: SamplingTensors | None):
        self.seq_ids, self.params = seq_ids, params
        self._out = out if out is None or out.token_ids.device.type == "cpu" else _to_host_async(out)
        self._done = None
        if out is not None and out.token_ids.device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record()

    def result(self, check_alive: Callable[[], None] | None = None) -> StepOutput:
        """Wait for the output. With `check_alive` (tensor parallelism), poll instead of
        blocking and call it every `CHECK_SECONDS`: a dead worker leaves the step's
        collectives waiting forever, and it must raise instead."""
        if self._out is None:
            return StepOutput.empty()
        if self._done is not None:
            if check_alive is None:
                self._done.synchronize()
            else:
                last_check = time.monotonic()
                while not self._done.query():
                    if time.monotonic() - last_check > CHECK_SECONDS:
                        check_alive()
                        last_check = time.monotonic()
                    time.sleep(0)  # let other threads run
        return to_step_output(self.seq_ids, self._out, self.params)


def _to_host_async(out: SamplerOutput) -> SamplerOutput:
    def copy(t):
        if t is None:
            return None
        if isinstance(t, tuple):
            return type(t)(*(copy(x) for x in t))
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    return copy(out)


def to_step_output(seq_ids: list[int], out: SamplerOutput, params: SamplingTensors) -> StepOutput:
    """Bring the sampler's output to the host, keyed by sequence id."""
    sampled = dict(zip(seq_ids, out.token_ids.tolist()))
    if out.logprobs is None:
        return StepOutput(sampled, {})
    rows = [i for i, k in enumerate(params.num_logprobs) if k >= 0]
    chosen = out.logprobs.sampled.tolist()
    top_ids, top_values = out.logprobs.top_ids.tolist(), out.logprobs.top_values.tolist()
    logprobs = {}
    for j, row in enumerate(rows):
        k = params.num_logprobs[row]
        logprobs[seq_ids[row]] = TokenLogprobs(chosen[j], dict(zip(top_ids[j][:k], top_values[j][:k])))
    return StepOutput(sampled, logprobs)
