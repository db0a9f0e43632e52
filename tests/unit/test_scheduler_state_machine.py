"""Scheduler + BlockManager as a state machine: requests arrive, steps run, and between
steps a sequence is finished from outside (a stop string), the newest is preempted, or
everything is aborted (an interrupted `generate`), in any order. After every rule the
block accounting, the prefix-cache table, the per-sequence state and the queues are
consistent; every step keeps the budget, the seats and decode-first order.

test_scheduler.test_random_request_mixes covers arrivals, steps, EOS / length finishes
and preemption under pressure; this adds the transitions that come from outside the
scheduler (`finish`, `abort_all`, a front-of-queue add) and the per-sequence dicts."""
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanovllm.engine.block_manager import NO_HASH
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import SequenceStatus
from tests.conftest import fuzz_examples
from tests.unit.test_block_manager import FakeKV
from tests.unit.test_scheduler import EOS, _check_batch, _prompt, make_scheduler, request, shape


class SchedulerMachine(RuleBasedStateMachine):
    sched: Scheduler

    @initialize(bs=st.sampled_from([16, 32]), num_blocks=st.integers(3, 8), max_num_seqs=st.integers(1, 5),
                max_num_batched_tokens=st.integers(1, 80), prefix_caching=st.booleans(), data=st.data())
    def configure(self, bs, num_blocks, max_num_seqs, max_num_batched_tokens, prefix_caching, data):
        max_model_len = data.draw(st.integers(2, num_blocks * bs))
        self.sched = make_scheduler(num_blocks=num_blocks, block_size=bs, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                    prefix_caching=prefix_caching)
        self.bs, self.max_model_len = bs, max_model_len
        self.fits = min(max_model_len, num_blocks * bs, 4 * bs)  # what request validation guarantees
        self.seats = min(max_num_seqs, max_num_batched_tokens)
        self.kv = FakeKV(bs)
        self.rng = random.Random(0)
        self.seqs = []

    @property
    def bm(self):
        return self.sched.block_manager

    # ---- rules ----------------------------------------------------------------------------
    @rule(stem=st.integers(0, 2), length=st.integers(1, 4 * 32), max_tokens=st.integers(1, 24),
          ignore_eos=st.booleans(), front=st.booleans())
    def add(self, stem, length, max_tokens, ignore_eos, front):
        length = min(length, self.fits - 1)
        max_tokens = max(1, min(max_tokens, self.fits - length))
        seq = request(length, max_tokens, ignore_eos, token_ids=_prompt(stem, length, self.bs))
        self.sched.add(seq, front=front)  # front: how the later samples of an n > 1 request queue
        self.seqs.append(seq)

    @rule()
    def step(self):
        if self.sched.is_finished():
            return
        before = {s: s.num_uncomputed_tokens for s in self.sched.running}
        batch = self.sched.schedule()
        _check_batch(self.sched, batch, before, self.seats)
        for seq, n in shape(batch):
            self.kv.write(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
        sampled = {s.seq_id: self.rng.choice([EOS, 3, 4, 4]) for s, n in shape(batch)
                   if s.num_computed_tokens + n == len(s)}
        for seq in self.sched.postprocess(batch, sampled):
            assert seq.is_finished and seq.block_table == []

    @precondition(lambda self: any(s.num_uncomputed_tokens == 1 and s.num_completion_tokens
                                   for s in self.sched.running))
    @rule(pick=st.integers(0, 7))
    def finish_on_a_stop_string(self, pick):
        """What the output processor does when a just-sampled token completes a stop string."""
        sampled = [s for s in self.sched.running if s.num_uncomputed_tokens == 1 and s.num_completion_tokens]
        seq = sampled[pick % len(sampled)]
        self.sched.finish(seq, "stop", "stop string")
        assert seq.is_finished and seq.block_table == [] and seq not in self.sched.running

    @precondition(lambda self: self.sched.running)
    @rule()
    def preempt_the_newest(self):
        victim = self.sched.running[-1]
        self.sched._preempt(victim)
        assert self.sched.waiting[0] is victim and victim.block_table == [] and victim.num_computed_tokens == 0

    @rule()
    def abort_all(self):
        """What an interrupted generate does."""
        live = self.sched.running + list(self.sched.waiting)
        assert sorted(s.seq_id for s in self.sched.abort_all()) == sorted(s.seq_id for s in live)
        assert all(s.is_finished and s.block_table == [] for s in live)
        assert self.bm.num_free_blocks == self.bm.num_blocks

    # ---- invariants -------------------------------------------------------------------------
    @invariant()
    def accounting_is_consistent(self):
        if not hasattr(self, "sched"):
            return
        bm, running, waiting = self.bm, self.sched.running, list(self.sched.waiting)
        bm.check_integrity(running)  # ref counts = holders, free list = unreferenced blocks
        held = {b for seq in running for b in seq.block_table}
        assert bm.num_free_blocks + len(held) == bm.num_blocks
        hashed = {blk.hash: blk.block_id for blk in bm.blocks if blk.hash != NO_HASH}
        assert len(hashed) == sum(blk.hash != NO_HASH for blk in bm.blocks) and bm.hash_to_block == hashed
        assert bm.enable_prefix_caching or not hashed
        for seq in running:
            # slots for every computed token; the token sampled last step gets its slot next step
            assert bm.blocks_needed(seq.num_computed_tokens) <= len(seq.block_table) <= seq.num_blocks(bm.block_size)
            assert len(set(seq.block_table)) == len(seq.block_table)
            assert seq.num_cached_tokens <= seq.num_computed_tokens <= len(seq)
            for i, block_id in enumerate(seq.block_table):
                if bm.blocks[block_id].hash != NO_HASH:  # registered only once its KV is computed
                    assert (i + 1) * bm.block_size <= seq.num_computed_tokens
                    assert bm.blocks[block_id].token_ids == tuple(seq.block_tokens(i, bm.block_size))
        self.kv.check(running)  # every computed token reads the K/V of its own prefix
        assert len(running) <= self.seats
        assert not {s.seq_id for s in running} & {s.seq_id for s in waiting}
        assert all(s.status == SequenceStatus.RUNNING for s in running)
        for seq in waiting:
            assert seq.status == SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
        # per-sequence state lives only as long as its sequence: nothing leaks across requests
        live = {s.seq_id for s in running + waiting}
        assert set(self.bm._seq_hashes) <= live
        assert set(self.bm._num_registered) == {s.seq_id for s in running}

    def teardown(self):
        """Whatever happened, the queued requests all finish, and every block comes back."""
        if not hasattr(self, "sched"):
            return
        bound = sum(len(s) + s.sampling_params.max_tokens for s in self.sched.running + list(self.sched.waiting))
        for _ in range(bound):
            if self.sched.is_finished():
                break
            self.step()
        assert self.sched.is_finished(), f"not finished within {bound} steps"
        assert self.bm.num_free_blocks == self.bm.num_blocks and not self.bm._seq_hashes
        for seq in self.seqs:
            assert seq.is_finished
            if seq.finish_reason is not None:  # (an aborted one has none)
                assert 1 <= seq.num_completion_tokens <= seq.sampling_params.max_tokens


SchedulerMachine.TestCase.settings = settings(max_examples=fuzz_examples(150), stateful_step_count=50, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_scheduler_state_machine = SchedulerMachine.TestCase
