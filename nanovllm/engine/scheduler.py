"""Continuous batching with chunked prefill, mixed decode + prefill steps, and
preemption by recompute.

A step has two halves on the host: `on_launch` (the step went to the device: advance
the computed counts, count one pending token per sampling sequence) and `on_output`
(its sampled ids arrived: append them, register full blocks, retire finished
sequences). With overlap scheduling the next step is scheduled and launched between
the two, so it sees sequences whose last token is still pending; a sequence that
turns out to have finished may run one step too many, and that step's token is dropped."""
from collections import deque
from dataclasses import dataclass

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledBatch:
    """One step's work: `seqs[i]` computes its next `num_scheduled_tokens[i]` tokens.

    Decodes (one token each) come first, then prefill chunks."""
    seqs: list[Sequence]
    num_scheduled_tokens: list[int]
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: frozenset[int]):
        self.block_manager = block_manager
        # each running sequence needs at least one token of the budget per step
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the newest is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue a request; `front` puts it first in line (the later samples of an n > 1
        request, whose prompt blocks are cached now)."""
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def abort_all(self) -> list[Sequence]:
        """Drop every request (after an interrupted step), freeing their blocks."""
        dropped = self.running + list(self.waiting)
        for seq in self.running:
            self.block_manager.free(seq)
        for seq in dropped:
            self.block_manager.forget(seq)
            seq.status = SequenceStatus.FINISHED
        self.running, self.waiting = [], deque()
        return dropped

    # ---- scheduling ----------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        seqs, counts = [], []
        budget = self.max_num_batched_tokens
        preempted = self._schedule_decodes(seqs, counts)
        num_decodes = len(seqs)
        budget -= num_decodes
        budget = self._schedule_prefill_chunks(seqs, counts, budget)
        if not preempted:  # don't readmit in the step that had to evict
            self._admit_waiting(seqs, counts, budget)
        return ScheduledBatch(seqs, counts, num_decodes)

    def _schedule_decodes(self, seqs: list[Sequence], counts: list[int]) -> bool:
        """One token for each running sequence that is decoding; preempt the newest
        running sequences when blocks run out. Returns whether any was preempted."""
        preempted = False
        block_size = self.block_manager.block_size
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:  # preempted by an earlier row of this loop
                continue
            num_tokens = len(seq)
            if num_tokens - seq.num_computed_tokens != 1 or self._reaches_length(seq, num_tokens):
                continue
            if len(seqs) == self.max_num_batched_tokens:
                break
            # most decodes write into a free slot of their last block; only one that
            # crosses a block boundary needs a new block (and may have to preempt for it)
            if num_tokens > len(seq.block_table) * block_size:
                while not self.block_manager.can_append(seq):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    continue
                self.block_manager.append_slots(seq)
            seqs.append(seq)
            counts.append(1)
        return preempted

    def _schedule_prefill_chunks(self, seqs: list[Sequence], counts: list[int], budget: int) -> int:
        """Continue the prefills of running sequences, one budget-limited chunk each."""
        # `seqs` holds this step's decodes, all running: if they are every running
        # sequence, none is mid-prefill (the common all-decode step)
        if len(seqs) == len(self.running):
            return budget
        for seq in self.running:
            if budget == 0:
                break
            num_uncomputed = seq.num_uncomputed_tokens
            if num_uncomputed > 1:
                n = min(num_uncomputed, budget)
                seqs.append(seq)
                counts.append(n)
                budget -= n
        return budget

    def _admit_waiting(self, seqs: list[Sequence], counts: list[int], budget: int) -> None:
        """Admit waiting sequences in FIFO order while budget, seats and blocks last."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # NOTE: a preempted sequence whose last id is still pending waits for it: the
            # prefix cache and the prefill need every token id on the host
            if seq.num_pending_tokens or not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will recompute all its tokens later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the step ------------------------------------------------------------
    def on_launch(self, batch: ScheduledBatch) -> list[Sequence]:
        """The step is on its way: each scheduled sequence has computed its tokens, and
        those that completed them sample one token, pending until `on_output`. Returns
        the sampling sequences (logits order)."""
        sampling = []
        for seq, n in zip(batch.seqs, batch.num_scheduled_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq):
                seq.num_pending_tokens += 1
                sampling.append(seq)
        return sampling

    def on_output(self, batch: ScheduledBatch, sampled: dict[int, int]) -> tuple[list[Sequence], dict[int, int]]:
        """The step's sampled ids arrived (`sampled`: seq_id -> token id): append them in
        order, register the blocks now full of known ids, and retire finished sequences.
        Returns (the sequences that finished, the ids kept); an id of a sequence that
        finished before this step's output came is dropped."""
        finished, kept = [], {}
        for seq in batch.seqs:
            if seq.is_finished:
                continue
            token_id = sampled.get(seq.seq_id)
            if token_id is not None:
                seq.num_pending_tokens -= 1
                seq.token_ids.append(token_id)
                kept[seq.seq_id] = token_id
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.commit(seq)
            reason = None if token_id is None else self._finish_reason(seq, token_id)
            if reason is not None:
                stop_reason = token_id if reason == "stop" and token_id in seq.sampling_params.stop_token_ids else None
                self.finish(seq, reason, stop_reason)
                finished.append(seq)
        return finished, kept

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Both halves at once (no overlap): returns the sequences that finished."""
        self.on_launch(batch)
        return self.on_output(batch, sampled)[0]

    def needs_every_token(self) -> bool:
        """Whether a running request needs its full output history on the host to be
        scheduled (penalties): then no step may be launched with an id still pending."""
        return any(seq.sampling_params.has_penalties for seq in self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Retire a sequence now, freeing its blocks (also when its text matched a stop
        string). Tokens still pending for it are dropped when their output arrives."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.status = SequenceStatus.FINISHED
        seq.num_pending_tokens = 0
        seq.grammar = None   # a finished request keeps its Sequence, not its matcher's state
        self.block_manager.free(seq)
        self.block_manager.forget(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:  # preempted while its last token was pending
            self.waiting.remove(seq)

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the pending tokens already make the sequence (`num_tokens` long, pending
        ones included) finish by length: it needs no further step (and must not take a
        block past its limit)."""
        return seq.num_pending_tokens > 0 and (
            num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens or num_tokens >= self.max_model_len)

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampling_params
        num_tokens = len(seq.token_ids)
        num_completion_tokens = num_tokens - seq.num_prompt_tokens
        # NOTE: no stop before min_tokens (the sampler masks EOS and stop ids until then)
        if num_completion_tokens > params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                return "stop"
        if num_completion_tokens >= params.max_tokens or num_tokens >= self.max_model_len:
            return "length"
        return None
