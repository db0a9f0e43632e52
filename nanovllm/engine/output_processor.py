"""From sampled tokens to what the user sees: text (incremental when streaming or when
stop strings must be found), logprobs, timing, finished-request dicts and stream deltas.

It also expands `n > 1`: sample 0 of a prompt is queued first and samples 1..n-1 once
its prompt blocks are in the prefix cache, so they share those blocks instead of
computing the prompt n times.
"""
import time
from dataclasses import dataclass, field, replace

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sampling_batch import StepOutput, TokenLogprobs
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.stop_checker import find_stop, stop_buffer_length
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class SampleState:
    """The output side of one sequence (one of a prompt's n samples)."""
    seq: Sequence
    request: "RequestState"
    sample_index: int
    detokenizer: IncrementalDetokenizer | None     # None: decode once, at the end
    logprobs: list[dict] | None = None
    text: str | None = None                        # final text, once finished
    first_token_time: float | None = None
    finished_time: float | None = None
    num_streamed_chars: int = 0

    @property
    def stopped_by_token(self) -> bool:
        """Finished on EOS or a stop token id: that token adds no text (vLLM's rule)."""
        return self.seq.finish_reason == "stop" and not isinstance(self.seq.stop_reason, str)

    def metrics(self) -> dict:
        """Seconds: to the first token, per output token after it, and from arrival to the end."""
        num_tokens = self.seq.num_completion_tokens
        decode_time = self.finished_time - self.first_token_time
        return {"time_to_first_token": self.first_token_time - self.request.arrival_time,
                "time_per_output_token": decode_time / (num_tokens - 1) if num_tokens > 1 else 0.0,
                "seconds": self.finished_time - self.request.arrival_time}

    def completion(self) -> dict:
        out = {"index": self.sample_index, "text": self.text, "token_ids": self.seq.completion_token_ids,
               "finish_reason": self.seq.finish_reason, "stop_reason": self.seq.stop_reason,
               "metrics": self.metrics()}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


@dataclass(slots=True, eq=False)
class RequestState:
    index: int                        # the prompt's position in the caller's list
    params: SamplingParams
    prompt_token_ids: list[int]
    stream: bool
    arrival_time: float
    samples: list[SampleState] = field(default_factory=list)
    waiting_samples: list[Sequence] = field(default_factory=list)   # queued once sample 0 has sampled

    def output(self) -> dict:
        """The result dict: sample 0's fields at the top level; all n under `outputs` when n > 1."""
        first = self.samples[0].completion()
        out = {"text": first["text"], "token_ids": first["token_ids"], "prompt_token_ids": self.prompt_token_ids,
               "finish_reason": first["finish_reason"], "stop_reason": first["stop_reason"],
               "metrics": first["metrics"]}
        if "logprobs" in first:
            out["logprobs"] = first["logprobs"]
        if self.params.n > 1:
            out["outputs"] = [first] + [s.completion() for s in self.samples[1:]]
        return out


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._samples: dict[int, SampleState] = {}   # seq_id -> its state
        self._deltas: list[dict] = []

    # ---- intake ------------------------------------------------------------------------
    def add(self, seqs: list[Sequence], stream: bool = False) -> list[RequestState]:
        """Track and queue one sequence per prompt (sample 0 of each); samples 1..n-1
        are made here and queued when their prompt's blocks can be shared."""
        now = time.perf_counter()
        requests = []
        for index, seq in enumerate(seqs):
            request = RequestState(index, seq.sampling_params, seq.token_ids[:seq.num_prompt_tokens], stream, now)
            self._track(request, seq)
            self.scheduler.add(seq)
            siblings = [Sequence(list(request.prompt_token_ids), _sample_params(request.params, k))
                        for k in range(1, request.params.n)]
            for sibling in siblings:
                self._track(request, sibling)
            if self._can_share_prompt(seq):
                request.waiting_samples = siblings
            else:
                for sibling in siblings:
                    self.scheduler.add(sibling)
            requests.append(request)
        return requests

    def _track(self, request: RequestState, seq: Sequence) -> None:
        params = seq.sampling_params
        detokenizer = IncrementalDetokenizer(self.tokenizer) if request.stream or params.stop else None
        state = SampleState(seq, request, len(request.samples), detokenizer,
                            [] if params.logprobs is not None else None)
        request.samples.append(state)
        self._samples[seq.seq_id] = state

    def _can_share_prompt(self, seq: Sequence) -> bool:
        """Whether the prompt has a full block that later samples could hit in the cache."""
        bm = self.scheduler.block_manager
        # NOTE: the last prompt token is never a prefix-cache hit
        return bm.enable_prefix_caching and (seq.num_prompt_tokens - 1) // bm.block_size > 0

    def release(self, requests: list[RequestState]) -> None:
        for request in requests:
            for state in request.samples:
                self._samples.pop(state.seq.seq_id, None)

    def abort(self) -> None:
        self._samples.clear()
        self._deltas.clear()

    # ---- after each step ---------------------------------------------------------------
    def process(self, output: StepOutput) -> list[Sequence]:
        """Record this step's tokens; finish the sequences whose text hit a stop string
        (their blocks are freed now). Returns those sequences."""
        now = time.perf_counter()
        stopped = []
        for seq_id, token_id in output.sampled.items():
            state = self._samples.get(seq_id)
            if state is None:  # queued on the scheduler directly, not through `add`
                continue
            if state.first_token_time is None:
                state.first_token_time = now
            if state.logprobs is not None:
                state.logprobs.append(_logprob_entry(token_id, output.logprobs[seq_id]))
            if self._update_text(state, token_id):
                stopped.append(state.seq)
            if state.seq.is_finished:
                self._finish(state, now)
            if state.request.stream:
                self._deltas.append(self._delta(state, token_id))
            self._queue_waiting_samples(state.request)
        return stopped

    def _update_text(self, state: SampleState, token_id: int) -> bool:
        """Detokenize the new token and look for stop strings; True if one matched and
        finished a running sequence."""
        detok, seq = state.detokenizer, state.seq
        if detok is None or state.stopped_by_token:
            return False
        num_new = len(detok.push([token_id]))
        if seq.is_finished:
            num_new += len(detok.flush())
        if seq.num_completion_tokens <= seq.sampling_params.min_tokens:
            return False  # NOTE: like EOS and stop ids, stop strings wait for min_tokens (vLLM's rule)
        match = find_stop(detok.text, num_new, seq.sampling_params.stop)
        if match is None:
            return False
        state.text = detok.text[:match.start]  # NOTE: the output ends before the match
        if seq.is_finished:  # it hit max_tokens with this token: the stop string wins, as in vLLM
            seq.finish_reason, seq.stop_reason = "stop", match.stop
            return False
        self.scheduler.finish(seq, "stop", match.stop)
        return True

    def _finish(self, state: SampleState, now: float) -> None:
        state.finished_time = now
        if state.text is not None:  # cut at a stop string
            return
        completion = state.seq.completion_token_ids
        if state.detokenizer is not None:
            state.detokenizer.flush()
            state.text = state.detokenizer.text
        else:
            token_ids = completion[:-1] if state.stopped_by_token else completion
            state.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _queue_waiting_samples(self, request: RequestState) -> None:
        """Sample 0 has sampled, so its prompt blocks are registered: queue the others first in line."""
        if request.waiting_samples:
            for seq in reversed(request.waiting_samples):
                self.scheduler.add(seq, front=True)
            request.waiting_samples = []

    # ---- streaming ---------------------------------------------------------------------
    def _delta(self, state: SampleState, token_id: int) -> dict:
        seq = state.seq
        if state.text is not None:
            visible = state.text
        else:  # hold back what a stop string could still claim
            text = state.detokenizer.text
            visible = text[:max(state.num_streamed_chars, len(text) - stop_buffer_length(seq.sampling_params.stop))]
        delta = {"index": state.request.index, "sample_index": state.sample_index,
                 "text": visible[state.num_streamed_chars:], "token_ids": [token_id], "finished": seq.is_finished,
                 "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason}
        if state.logprobs is not None:
            delta["logprobs"] = [state.logprobs[-1]]
        state.num_streamed_chars = len(visible)
        return delta

    def take_deltas(self) -> list[dict]:
        deltas, self._deltas = self._deltas, []
        return deltas


def _sample_params(params: SamplingParams, k: int) -> SamplingParams:
    """Sample k of a seeded request draws with seed + k (vLLM's rule), so samples differ."""
    return params if params.seed is None else replace(params, seed=params.seed + k)


def _logprob_entry(token_id: int, logprobs: TokenLogprobs) -> dict:
    return {"token_id": token_id, "logprob": logprobs.logprob, "top_logprobs": logprobs.top_logprobs}
