"""The engine: request intake and validation, the step loop, detokenization, progress."""
import contextlib
import gc
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from numbers import Integral

import torch

from nanovllm.config import Config, ModelConfig, check_sliding_window, read_hf_config, read_json_object
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.chat import chat_prompt_ids
from nanovllm.engine.input_batch import build_step_inputs
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.output_processor import OutputProcessor, RequestState
from nanovllm.engine.progress import TokenProgress
from nanovllm.engine.sampling_batch import PendingOutput, StepOutput
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.structured_output import GrammarManager
from nanovllm.engine.worker import WorkerGroup
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.model_path import load_tokenizer, resolve_model_path

logger = logging.getLogger("nanovllm")

Prompt = str | list[int]
BUSY = ("{what}: this LLM is already running a generate()/stream() (in another thread, or a stream not yet "
        "exhausted); finish or close it first")


def _eos_ids(path: str, tokenizer, hf_config: dict) -> frozenset[int]:
    """Every EOS id: the tokenizer's, config.json's and generation_config.json's."""
    ids = set()
    sources = [tokenizer.eos_token_id, hf_config.get("eos_token_id")]
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        sources.append(read_json_object(gen_path).get("eos_token_id"))
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return frozenset(ids)


def _is_token_ids(prompt) -> bool:
    """A sequence of integers (numpy's too); bytes are a sequence of ints, but never token ids."""
    if not isinstance(prompt, SequenceABC) or isinstance(prompt, (str, bytes, bytearray)):
        return False
    # NOTE: each distinct type is checked once: an isinstance per token cost ~1 s a million ids
    return all(issubclass(t, Integral) and not issubclass(t, bool) for t in set(map(type, prompt)))


@dataclass
class InFlight:
    """A launched step whose output the host has not processed yet."""
    batch: ScheduledBatch
    output: PendingOutput

    def rows(self) -> dict[int, int]:
        """seq_id -> its row in the step's sampled ids."""
        return {seq_id: i for i, seq_id in enumerate(self.output.seq_ids)}


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        # "demo" and GGUF files resolve to an HF directory (converted once, cached)
        self.config = Config.from_kwargs(resolve_model_path(model), **kwargs)
        path = self.config.model
        hf_config = read_hf_config(path)  # read once: the model config and the EOS ids come from it
        self.model_config = ModelConfig.from_hf(hf_config)
        # derived, never written back into the user's config
        self.max_model_len = min(self.config.max_model_len, self.model_config.max_position_embeddings)
        self.device = self.config.resolved_device
        check_sliding_window(hf_config, self.max_model_len)
        self.tokenizer = load_tokenizer(path)
        self.eos_token_ids = _eos_ids(path, self.tokenizer, hf_config)
        self.model_config.check_tensor_parallel(self.config.tensor_parallel_size)
        if self.device.type == "cuda" and self.config.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {self.config.tensor_parallel_size} exceeds the "
                             f"{torch.cuda.device_count()} visible CUDA devices")
        self.workers = None
        if self.config.tensor_parallel_size > 1:
            self.workers = WorkerGroup(self.config, self.model_config, self.max_model_len)
        try:
            store = self.workers.rendezvous() if self.workers else None
            self.model_runner = ModelRunner(self.config, self.model_config, self.max_model_len, self.device, 0,
                                            store)
        except BaseException:
            if self.workers:
                self.workers.kill()  # NOTE: nothing of theirs is worth waiting for
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.model_runner, self.workers)
        self.block_manager = BlockManager(self.model_runner.num_kvcache_blocks, self.config.kvcache_block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   self.max_model_len, self.eos_token_ids)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler)
        self.grammars = GrammarManager(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._in_flight: InFlight | None = None
        self._busy = threading.Lock()   # held by the one generate() or started stream() that runs
        self._num_calls = self._collected_for = 0

    def engine_info(self) -> dict:
        blocks, bs = self.model_runner.num_kvcache_blocks, self.config.kvcache_block_size
        return {"num_kvcache_blocks": blocks, "kvcache_block_size": bs, "kv_cache_tokens": blocks * bs,
                "attention_backend": self.model_runner.backend_name, "device": str(self.device),
                "dtype": str(self.model_runner.dtype).replace("torch.", ""), "max_model_len": self.max_model_len,
                "kv_cache_dtype": str(self.model_runner.kv_pool.cache.dtype).replace("torch.", "")}

    # ---- intake ------------------------------------------------------------------------
    def _token_ids(self, name: str, prompt) -> list[int]:
        if isinstance(prompt, str):
            try:
                token_ids = self.tokenizer.encode(prompt)
            except (TypeError, ValueError) as e:  # e.g. a lone surrogate
                raise ValueError(f"{name} cannot be tokenized: {e}") from e
        elif _is_token_ids(prompt):
            token_ids = list(map(int, prompt))  # NOTE: numpy integers become plain ints
        else:
            raise TypeError(f"{name} must be a string or a list of int token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError(f"{name} is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise ValueError(f"{name} has token id {bad} outside [0, {vocab})")
        return token_ids

    def _check_fits(self, name: str, num_prompt_tokens: int, params: SamplingParams) -> None:
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"{name}: prompt length {num_prompt_tokens} + max_tokens {params.max_tokens} = "
                             f"{total} exceeds max_model_len {self.max_model_len}")
        blocks = self.block_manager.blocks_needed(total)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"{name}: {total} tokens need {blocks} KV blocks but the whole cache has "
                             f"{self.block_manager.num_blocks}")

    def _check_params(self, i: int, params: SamplingParams) -> None:
        """The checks that need the model: token ids within the vocabulary."""
        vocab = self.model_config.vocab_size
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"sampling_params[{i}]: logprobs must be <= vocab_size {vocab}, got {params.logprobs}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"sampling_params[{i}]: stop_token_ids has {bad[0]} outside [0, {vocab})")
        self.grammars.check(i, params)  # compiles the constraint (cached)

    def make_requests(self, prompts, sampling_params, what: str = "prompts") -> list[Sequence]:
        """Validate every request before any is queued: a bad one raises and none runs.
        Errors name a request as `{what}[i]` (chat: conversations[i])."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and _is_token_ids(prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string, a list of token ids or a list of those, "
                            f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, "
                            f"got {type(sampling_params).__name__}")
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} {what} but {len(sampling_params)} sampling params")
        seqs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}")
            token_ids = self._token_ids(f"{what}[{i}]", prompt)
            self._check_fits(f"{what}[{i}]", len(token_ids), params)
            self._check_params(i, params)
            seqs.append(Sequence(token_ids, params))
        return seqs

    # ---- the loop ----------------------------------------------------------------------
    def step(self) -> tuple[list[Sequence], int, int]:
        """Schedule and launch one step, then process the output of the step before it
        (overlap) or of this one (`enable_overlap=False`). Returns (the sequences that
        finished, prefill tokens, decode tokens launched).

        With overlap the host schedules and prepares step N+1 while the device runs step
        N; the ids step N samples stay on the device as step N+1's inputs."""
        # NOTE: a step runs whole: TP ranks never fall out of lockstep, and a Ctrl-C never
        # lands mid-bookkeeping (a sequence holding blocks in neither queue would leak them)
        with _deferred_sigint():
            finished = []
            if self._in_flight is not None and self.scheduler.needs_every_token():
                finished += self._process(self._take_in_flight())
            batch = self.scheduler.schedule()
            launched = None
            if batch.seqs:
                prev_rows = self._in_flight.rows() if self._in_flight is not None else {}
                inputs = build_step_inputs(batch, self.config.kvcache_block_size, self.eos_token_ids, prev_rows,
                                           self.model_runner.decode_unit_size)
                if self.grammars.constrains(batch.seqs):
                    output, done = self._run_constrained_step(batch, inputs)
                    finished += done
                else:
                    output = self._run_step(inputs)
                    self.scheduler.on_launch(batch)
                launched = InFlight(batch, output)
            elif self._in_flight is None and not self.scheduler.is_finished():
                raise RuntimeError("scheduler produced an empty step with requests pending (this is a bug)")
            previous, self._in_flight = self._in_flight, launched
            if previous is not None:
                finished += self._process(previous)
            if not self.config.enable_overlap and self._in_flight is not None:
                finished += self._process(self._take_in_flight())
        return finished, batch.num_tokens - batch.num_decodes, batch.num_decodes

    def _take_in_flight(self) -> InFlight:
        flight, self._in_flight = self._in_flight, None
        return flight

    def _process(self, flight: InFlight) -> list[Sequence]:
        """Wait for a launched step's sampled ids, then advance its sequences and their outputs."""
        output = flight.output.result(self.workers.check_step if self.workers else None)
        finished, kept = self.scheduler.on_output(flight.batch, output.sampled)
        for seq, reason in self.grammars.advance(flight.batch.seqs, kept):
            if seq.is_finished:  # on the EOS forced at a dead end
                seq.finish_reason, seq.stop_reason = reason, None
            else:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        logprobs = {seq_id: lp for seq_id, lp in output.logprobs.items() if seq_id in kept}
        # text, stop strings (they finish sequences too), logprobs
        return finished + self.outputs.process(StepOutput(kept, logprobs))

    def abort_all(self) -> None:
        """Drop every request and the step in flight; the engine stays usable, every block free."""
        self._in_flight = None
        self.scheduler.abort_all()
        self.outputs.abort()

    def has_unfinished_work(self) -> bool:
        return not self.scheduler.is_finished() or self._in_flight is not None

    def _run_step(self, inputs) -> PendingOutput:
        self._ship(inputs)
        with self._naming_dead_worker():
            return self.model_runner.run(inputs)

    def _run_constrained_step(self, batch: ScheduledBatch, inputs) -> tuple[PendingOutput, list[Sequence]]:
        """A step with grammar-constrained sequences: their masks need the previous step's
        ids. Launch the forward, process the previous step and fill the masks while the
        device runs it, then sample. Returns the output and the sequences that finished."""
        self._ship(inputs)
        with self._naming_dead_worker():
            self.model_runner.launch(inputs)
        sampling = self.scheduler.on_launch(batch)
        assert [seq.seq_id for seq in sampling] == inputs.sampling_seq_ids, "mask rows must be the logits rows"
        finished = self._process(self._take_in_flight()) if self._in_flight is not None else []
        grammar = self.grammars.fill(sampling)
        with self._naming_dead_worker():
            return self.model_runner.sample(grammar), finished

    def _ship(self, inputs) -> None:
        """Send the step to the tensor-parallel workers (they run it whole)."""
        if self.workers:
            self.workers.check_alive()
            self.workers.call("run", inputs)

    @contextlib.contextmanager
    def _naming_dead_worker(self):
        """A collective that failed on rank 0 raises the dead worker's error if one died."""
        try:
            yield
        except Exception as e:  # a collective failed: name the dead or stuck worker if there is one
            failure = self.workers.explain() if self.workers else None
            if failure is not None:
                raise failure from e
            raise

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Generate completions for `prompts` (strings or token-id lists). Returns one dict
        per prompt, in order:
          text, token_ids (generated), prompt_token_ids,
          finish_reason: "stop" (EOS, a stop token id, a stop string or a completed structured
            output), "length", or "abort" (a structured output the vocabulary cannot continue),
          stop_reason: the stop string or stop token id that ended it (None otherwise),
          metrics: {"time_to_first_token", "time_per_output_token", "seconds"} (seconds),
          logprobs (when asked): per generated token {"token_id", "logprob", "top_logprobs": {id: logprob}},
          outputs (when n > 1): the n completions, each with the fields above and its index;
            the top-level fields are the first's."""
        return self._generate(self.make_requests(prompts, sampling_params), use_tqdm)

    def _generate(self, seqs: list[Sequence], use_tqdm: bool) -> list[dict]:
        with self._exclusive("generate()"):
            requests = self.outputs.add(seqs)
            for _ in self._run(requests, use_tqdm):
                pass
        return [request.output() for request in requests]

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[dict]:
        """Like `generate`, but yields deltas as tokens are produced: {"index": the prompt's,
        "sample_index", "text": new text, "token_ids": new ids, "finished", "finish_reason",
        "stop_reason"} (+ "logprobs" when asked). A sample's deltas add up to generate's
        text and token_ids. Requests are validated now; they run as the iterator is consumed,
        and closing it early drops them. One generate or stream runs at a time: a stream holds
        the engine from its first next() until it is exhausted or closed, and another call
        meanwhile raises RuntimeError (see docs/reliability.md)."""
        self._check_idle("stream()")  # fail early; the engine is taken at the first next()
        seqs = self.make_requests(prompts, sampling_params)
        return self._stream(seqs)

    def _stream(self, seqs: list[Sequence]) -> Iterator[dict]:
        with self._exclusive("stream()"):
            yield from self._run(self.outputs.add(seqs, stream=True), use_tqdm=False)

    def _check_idle(self, what: str) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"{what} on an LLM that was shut down (exit() was called); make a new LLM")
        if self._busy.locked() and self._collected_for != self._num_calls:
            self._collected_for = self._num_calls  # NOTE: a full collection is slow: once per holder
            gc.collect()  # an abandoned, half-read stream in a reference cycle lets go when collected
        if self._busy.locked():
            raise RuntimeError(BUSY.format(what=what))

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        """One caller at a time: results of two callers would mix in the one step loop."""
        self._check_idle(what)
        if not self._busy.acquire(blocking=False):  # another thread won the race since the check
            raise RuntimeError(BUSY.format(what=what))
        self._num_calls += 1
        try:
            yield
        finally:
            self._busy.release()

    # ---- chat: conversations through the chat template, then generate / stream --------
    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[dict]:
        """`generate` on conversations: `messages` is one conversation (a list of
        {"role", "content"} dicts) or a list of them, each turned into prompt token ids by
        the tokenizer's chat template (or `chat_template`); `chat_template_kwargs` go to the
        template (e.g. Qwen3's enable_thinking=False). Returns generate's dicts, one per conversation."""
        prompts = chat_prompt_ids(self.tokenizer, messages, chat_template, add_generation_prompt, chat_template_kwargs)
        return self._generate(self.make_requests(prompts, sampling_params, "conversations"), use_tqdm)

    def chat_stream(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                    chat_template: str | None = None, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> Iterator[dict]:
        """`stream` on conversations, as `chat` takes them; a delta's `index` is its conversation's."""
        self._check_idle("stream()")
        prompts = chat_prompt_ids(self.tokenizer, messages, chat_template, add_generation_prompt, chat_template_kwargs)
        return self._stream(self.make_requests(prompts, sampling_params, "conversations"))

    def _run(self, requests: list[RequestState], use_tqdm: bool) -> Iterator[dict]:
        """Step until the scheduler is empty, yielding stream deltas after each step."""
        progress = TokenProgress(requests, use_tqdm)
        try:
            while self.has_unfinished_work():
                self.step()
                progress.update()
                yield from self.outputs.take_deltas()
        except BaseException:  # also a stream closed early (GeneratorExit)
            self.abort_all()
            raise
        finally:
            progress.close()
            self.outputs.release(requests)

    def exit(self) -> None:
        """Free CUDA graphs, stop tensor-parallel workers, release shared memory."""
        self._finalizer()


def _shutdown(model_runner: ModelRunner, workers: WorkerGroup | None) -> None:
    if workers:
        workers.shutdown()
    # NOTE: after a worker died mid-collective, rank 0's NCCL work never completes: abort it
    model_runner.exit(abort=bool(workers and workers.died))


@contextlib.contextmanager
def _deferred_sigint():
    """Hold a Ctrl-C that arrives mid-step until the step is done, then raise it.
    NOTE: only over Python's default handler; a handler the user set (or SIG_IGN) is theirs."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if caught:
        raise KeyboardInterrupt
