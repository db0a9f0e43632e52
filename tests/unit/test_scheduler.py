"""Scheduler + BlockManager driven directly, with fake sampled tokens: budgets, seats,
chunk sizes, decode-first ordering, preemption by recompute and finishing."""
import random
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams
from tests.unit.test_block_manager import FakeKV

EOS = 1
TOKEN = 7  # what the fake sampler returns unless told otherwise
_starts = count(1000, 1000)


def make_scheduler(num_blocks: int = 64, block_size: int = 16, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 4096,
                   prefix_caching: bool = True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len, frozenset({EOS}))


def request(num_tokens: int, max_tokens: int = 4, ignore_eos: bool = False, token_ids=None) -> Sequence:
    """A prompt of distinct tokens that shares no block with any other request's."""
    if token_ids is None:
        start = next(_starts)
        token_ids = list(range(start, start + num_tokens))
    return Sequence(token_ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos))


def step(sched: Scheduler, sample=lambda seq: TOKEN) -> tuple[ScheduledBatch, list[Sequence]]:
    """schedule -> fake model (a token for each sequence that completes its tokens) -> postprocess."""
    batch = sched.schedule()
    sampled = {seq.seq_id: sample(seq) for seq, n in zip(batch.seqs, batch.num_scheduled_tokens)
               if seq.num_computed_tokens + n == len(seq)}
    return batch, sched.postprocess(batch, sampled)


def shape(batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
    return list(zip(batch.seqs, batch.num_scheduled_tokens))


# ---- chunked prefill and budgets ------------------------------------------------------------

def test_long_prompt_is_chunked_with_exact_sizes():
    sched = make_scheduler(max_num_batched_tokens=40)
    a = request(100, max_tokens=2)
    sched.add(a)
    for chunk, computed in [(40, 40), (40, 80), (20, 100)]:  # the last chunk samples
        batch, _ = step(sched)
        assert (shape(batch), batch.num_decodes, a.num_computed_tokens) == ([(a, chunk)], 0, computed)
    assert len(a) == 101
    batch, finished = step(sched)
    assert (shape(batch), batch.num_decodes) == ([(a, 1)], 1)
    assert finished == [a] and a.finish_reason == "length" and a.completion_token_ids == [TOKEN, TOKEN]
    assert sched.is_finished() and sched.block_manager.num_free_blocks == 64


def test_decodes_first_then_leftover_budget_to_prefill_chunks():
    sched = make_scheduler(max_num_batched_tokens=40)
    a = request(10, max_tokens=10)
    sched.add(a)
    assert shape(step(sched)[0]) == [(a, 10)]
    b, c = request(100), request(30)
    sched.add(b)
    sched.add(c)
    expected = [  # (sequence, tokens) pairs, number of decodes
        ([(a, 1), (b, 39)], 1),            # B admitted with what the decode left; C waits (no budget)
        ([(a, 1), (b, 39)], 1),            # B's next chunk
        ([(a, 1), (b, 22), (c, 17)], 1),   # B's last chunk samples; C admitted with the rest
        ([(a, 1), (b, 1), (c, 13)], 2),    # two decodes first, then C's last chunk
        ([(a, 1), (b, 1), (c, 1)], 3),
    ]
    for pairs, num_decodes in expected:
        batch, _ = step(sched)
        assert (shape(batch), batch.num_decodes) == (pairs, num_decodes)


def test_budget_is_split_across_admissions():
    sched = make_scheduler(max_num_batched_tokens=64)
    a, b, c = request(30), request(30), request(30)
    for seq in (a, b, c):
        sched.add(seq)
    batch, _ = step(sched)
    assert shape(batch) == [(a, 30), (b, 30), (c, 4)] and batch.num_decodes == 0
    batch, _ = step(sched)
    assert shape(batch) == [(a, 1), (b, 1), (c, 26)] and batch.num_decodes == 2


def test_prefill_chunks_continue_in_admission_order():
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b = request(20), request(20)
    sched.add(a)
    sched.add(b)
    assert shape(step(sched)[0]) == [(a, 16)]
    assert shape(step(sched)[0]) == [(a, 4), (b, 12)]
    assert shape(step(sched)[0]) == [(a, 1), (b, 8)]


def test_max_num_seqs_limits_running_sequences():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [request(5, max_tokens=3) for _ in range(4)]
    for seq in seqs:
        sched.add(seq)
    admitted_at, i = {}, 0
    while not sched.is_finished() and i < 20:
        i += 1
        batch, _ = step(sched)
        assert len(sched.running) <= 2 and len(batch) <= 2
        for seq in batch.seqs:
            admitted_at.setdefault(seq.seq_id, i)
    # A and B sample at steps 1, 2, 3 and finish; C and D take their seats at step 4
    assert [admitted_at[s.seq_id] for s in seqs] == [1, 1, 4, 4]
    assert sched.is_finished()


def test_each_seat_needs_a_token_of_the_budget():
    sched = make_scheduler(max_num_seqs=8, max_num_batched_tokens=3)
    for _ in range(5):
        sched.add(request(1, max_tokens=5))
    for _ in range(4):
        batch, _ = step(sched)
        assert len(sched.running) <= 3 and batch.num_tokens <= 3


# ---- preemption by recompute ------------------------------------------------------------------

@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_picks_the_newest_and_recomputes_it(prefix_caching):
    # 4 blocks of 16: A and B (31-token prompts) take two each; both want a third at 33 tokens
    sched = make_scheduler(num_blocks=4, prefix_caching=prefix_caching)
    bm = sched.block_manager
    a, b = request(31, max_tokens=3), request(31, max_tokens=3)
    sched.add(a)
    sched.add(b)
    assert shape(step(sched)[0]) == [(a, 31), (b, 31)]
    assert shape(step(sched)[0]) == [(a, 1), (b, 1)]
    assert (a.block_table, b.block_table, len(a), len(b)) == ([0, 1], [2, 3], 33, 33)
    c = request(31, max_tokens=1)
    sched.add(c)  # no free block: C waits

    batch = sched.schedule()  # A needs a block: B, the newest, is preempted
    assert shape(batch) == [(a, 1)]
    # the preempted request goes back to the front of the queue, ahead of C
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b, c] and sched.running == [a]
    assert (b.status, b.num_computed_tokens, b.block_table) == (SequenceStatus.WAITING, 0, [])
    # cached: B's tail block is evicted first; uncached: freed blocks are reused head first
    assert a.block_table == ([0, 1, 3] if prefix_caching else [0, 1, 2])
    finished = sched.postprocess(batch, {a.seq_id: TOKEN})
    assert finished == [a] and bm.num_free_blocks == 4

    batch = sched.schedule()  # B recomputes all 33 of its tokens, less what is still cached
    hits = 16 if prefix_caching else 0  # B's first block survived in the cache
    assert shape(batch) == [(b, 33 - hits)]  # B takes 3 blocks; C (2) does not fit in the last one
    assert b.num_computed_tokens == b.num_cached_tokens == hits
    finished = sched.postprocess(batch, {b.seq_id: TOKEN})
    assert finished == [b] and b.completion_token_ids == [TOKEN] * 3 and b.finish_reason == "length"
    assert shape(step(sched)[0]) == [(c, 31)]
    assert sched.is_finished()
    bm.check_integrity([])


def test_preempting_a_sequence_mid_prefill_restarts_its_prefill():
    sched = make_scheduler(num_blocks=5, max_num_batched_tokens=20)
    a, b = request(31, max_tokens=10), request(40, max_tokens=1)
    sched.add(a)
    step(sched)
    step(sched)  # A's first chunk 20, then its last 11 (samples)
    sched.add(b)
    batch, _ = step(sched)
    assert shape(batch) == [(a, 1), (b, 19)] and len(a) == 33
    batch, _ = step(sched)  # A needs a third block: B (mid-prefill, 19 computed) is preempted
    assert shape(batch) == [(a, 1)]
    assert (b.status, b.num_computed_tokens, b.block_table) == (SequenceStatus.WAITING, 0, [])
    for _ in range(20):
        batch, _ = step(sched)
        if b in batch.seqs:
            break
    assert a.is_finished and shape(batch) == [(b, 20)]
    assert b.num_cached_tokens == 16  # the full block it computed before preemption was cached


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_all_requests_finish_under_a_tiny_cache(prefix_caching):
    # 6 blocks of 16; each request peaks at 50 tokens = 4 blocks, so at most one runs alone
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=48, prefix_caching=prefix_caching)
    seqs = [request(30, max_tokens=20) for _ in range(8)]
    for seq in seqs:
        sched.add(seq)
    kv = FakeKV(16)
    for _ in range(1000):
        if sched.is_finished():
            break
        batch = sched.schedule()
        assert batch.seqs and batch.num_tokens <= 48
        for seq, n in shape(batch):
            kv.write(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
        sched.postprocess(batch, {s.seq_id: TOKEN for s, n in shape(batch) if s.num_computed_tokens + n == len(s)})
        sched.block_manager.check_integrity(sched.running)
        kv.check(sched.running)
    assert sched.is_finished(), "did not finish within 1000 steps"
    assert sched.num_preemptions > 0
    assert all(s.finish_reason == "length" and s.completion_token_ids == [TOKEN] * 20 for s in seqs)
    assert sched.block_manager.num_free_blocks == 6


# ---- finishing ----------------------------------------------------------------------------------

def eos_at(k: int):
    """A sampler that emits EOS as the k-th completion token (1-based)."""
    return lambda seq: EOS if seq.num_completion_tokens == k - 1 else TOKEN


def run_to_end(sched: Scheduler, sample, max_steps: int = 100) -> None:
    for _ in range(max_steps):
        if sched.is_finished():
            return
        step(sched, sample)
    raise AssertionError(f"not finished after {max_steps} steps")


def test_eos_finishes_with_stop():
    sched = make_scheduler()
    seq = request(5, max_tokens=10)
    sched.add(seq)
    run_to_end(sched, eos_at(3))
    assert seq.finish_reason == "stop" and seq.completion_token_ids == [TOKEN, TOKEN, EOS]
    assert seq.block_table == [] and sched.block_manager.num_free_blocks == 64


def test_eos_as_the_first_token_finishes_at_prefill():
    sched = make_scheduler()
    seq = request(5, max_tokens=10)
    sched.add(seq)
    _, finished = step(sched, eos_at(1))
    assert finished == [seq] and seq.finish_reason == "stop" and seq.completion_token_ids == [EOS]


def test_ignore_eos_runs_to_max_tokens():
    sched = make_scheduler()
    seq = request(5, max_tokens=6, ignore_eos=True)
    sched.add(seq)
    run_to_end(sched, eos_at(2))
    assert seq.finish_reason == "length" and seq.completion_token_ids == [TOKEN, EOS] + [TOKEN] * 4


def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    seq = request(5, max_tokens=1)
    sched.add(seq)
    _, finished = step(sched)
    assert finished == [seq] and seq.finish_reason == "length" and seq.completion_token_ids == [TOKEN]


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=8)
    seq = request(5, max_tokens=100)
    sched.add(seq)
    run_to_end(sched, lambda s: TOKEN)
    assert seq.finish_reason == "length" and len(seq) == 8


def test_finished_sequence_leaves_running_and_frees_its_blocks():
    sched = make_scheduler(num_blocks=8)
    a, b = request(20, max_tokens=1), request(20, max_tokens=3)
    sched.add(a)
    sched.add(b)
    _, finished = step(sched)
    assert finished == [a] and sched.running == [b]
    assert sched.block_manager.num_free_blocks == 8 - 2
    sched.block_manager.check_integrity(sched.running)


# ---- property: random request mixes through small configurations ----------------------------

def _prompt(alphabet_index: int, length: int, bs: int) -> list[int]:
    """Prompts cut from a few shared stems, so prefix hits and dedupes happen."""
    stems = [list(range(100, 100 + 4 * bs)), list(range(100, 100 + bs)) + list(range(5000, 5000 + 3 * bs)),
             list(range(9000, 9000 + 4 * bs))]
    return stems[alphabet_index][:length]


@st.composite
def scenarios(draw):
    bs = draw(st.sampled_from([16, 32]))
    num_blocks = draw(st.integers(3, 8))
    max_model_len = draw(st.integers(2, num_blocks * bs))
    fits = min(max_model_len, num_blocks * bs, 4 * bs)  # what request validation guarantees
    requests = draw(st.lists(st.tuples(
        st.integers(0, 2),                                      # stem
        st.sampled_from([1, 5, bs - 1, bs, bs + 1, 2 * bs, 2 * bs + 7, 3 * bs, 4 * bs]),  # prompt length
        st.integers(1, 24),                                     # max_tokens
        st.booleans(),                                          # ignore_eos
        st.sampled_from([0, 0, 1, 3, 10]),                      # arrival step
    ), min_size=2, max_size=8))
    # clip to what request validation guarantees: prompt + max_tokens fits
    requests = [(stem, min(n, fits - 1), max(1, min(m, fits - min(n, fits - 1))), ign, arr)
                for stem, n, m, ign, arr in requests]
    config = dict(num_blocks=num_blocks, block_size=bs, max_num_seqs=draw(st.integers(1, 5)),
                  max_num_batched_tokens=draw(st.integers(1, 80)), max_model_len=max_model_len,
                  prefix_caching=draw(st.booleans()))
    return config, requests, draw(st.integers(0, 2**16))


def _check_batch(sched: Scheduler, batch: ScheduledBatch, before: dict[Sequence, int], seats: int) -> None:
    """`before`: the running sequences before the step, oldest first, with their uncomputed token counts."""
    assert batch.seqs, "empty step with requests pending"
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(batch) <= seats and len(sched.running) <= seats
    assert len({s.seq_id for s in batch.seqs}) == len(batch)
    for i, (seq, n) in enumerate(shape(batch)):
        assert seq.status == SequenceStatus.RUNNING and 1 <= n <= seq.num_uncomputed_tokens
        assert len(seq.block_table) == seq.num_blocks(sched.block_manager.block_size)
        if i < batch.num_decodes:
            assert n == 1 and seq.num_uncomputed_tokens == 1
    scheduled = {s.seq_id for s in batch.seqs}
    # decodes come first: every decode still running was scheduled
    assert all(s.seq_id in scheduled for s in sched.running if before.get(s) == 1)
    # preemption takes the newest first: the preempted are a suffix of the running order
    preempted = [s for s in before if s.status == SequenceStatus.WAITING]
    assert preempted == list(before)[len(before) - len(preempted):]
    for seq in preempted:
        assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq in sched.waiting
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_request_mixes(scenario):
    config, requests, seed = scenario
    rng = random.Random(seed)
    sched = make_scheduler(**config)
    bm, bs = sched.block_manager, config["block_size"]
    seats = min(config["max_num_seqs"], config["max_num_batched_tokens"])
    kv = FakeKV(bs)
    pending = sorted(requests, key=lambda r: r[4])
    seqs = []
    # the oldest running sequence is never preempted and computes >= 1 token a step, so
    # each request is done within prompt + max_tokens steps of becoming the oldest
    bound = sum(n + m for _, n, m, _, _ in requests)
    steps = 0
    while pending or not sched.is_finished():
        while pending and (pending[0][4] <= steps or sched.is_finished()):
            stem, n, m, ignore_eos, _ = pending.pop(0)
            seqs.append(request(n, m, ignore_eos, token_ids=_prompt(stem, n, bs)))
            sched.add(seqs[-1])
        before = {s: s.num_uncomputed_tokens for s in sched.running}
        batch = sched.schedule()
        _check_batch(sched, batch, before, seats)
        bm.check_integrity(sched.running)
        for seq, n in shape(batch):
            kv.write(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
        sampled = {s.seq_id: rng.choice([EOS, 3, 4, 4]) for s, n in shape(batch)
                   if s.num_computed_tokens + n == len(s)}
        for seq in sched.postprocess(batch, sampled):
            assert seq.is_finished and seq.block_table == []
        bm.check_integrity(sched.running)
        kv.check(sched.running)
        steps += 1
        assert steps <= bound, f"no termination within {bound} steps"
    assert bm.num_free_blocks == bm.num_blocks
    for seq in seqs:
        completion = seq.completion_token_ids
        assert 1 <= len(completion) <= seq.sampling_params.max_tokens
        if seq.finish_reason == "stop":
            assert completion[-1] == EOS and not seq.sampling_params.ignore_eos
        else:
            assert seq.finish_reason == "length"
            assert len(completion) == seq.sampling_params.max_tokens or len(seq) >= config["max_model_len"]
        if not seq.sampling_params.ignore_eos:
            assert EOS not in completion[:-1]


# ---- overlap: a step launched before the previous step's output is processed -----------------

def test_overlap_pending_tokens_preemption_and_late_finishes():
    """Step 2 is scheduled while step 1's ids are pending. B, preempted with its id still
    pending, is finished from the waiting queue when that id turns out to be EOS; A's
    EOS arrives while its next step is in flight, whose token is then dropped; the
    length limit is known ahead, so no step runs past it."""
    sched = make_scheduler(num_blocks=2, block_size=16)
    a, b = request(16, max_tokens=3), request(16, max_tokens=3)
    sched.add(a)
    sched.add(b)
    step1 = sched.schedule()
    assert shape(step1) == [(a, 16), (b, 16)]
    assert sched.on_launch(step1) == [a, b]
    assert (len(a), len(a.token_ids), a.num_pending_tokens) == (17, 16, 1)

    # step 2: A's decode needs a second block; the newest (B) is preempted, its id pending
    step2 = sched.schedule()
    assert shape(step2) == [(a, 1)] and b in sched.waiting and b.num_pending_tokens == 1
    sched.on_launch(step2)
    assert a.num_pending_tokens == 2
    sched.block_manager.check_integrity(sched.running)

    finished, kept = sched.on_output(step1, {a.seq_id: TOKEN, b.seq_id: EOS})
    assert finished == [b] and b.finish_reason == "stop" and b.completion_token_ids == [EOS]
    assert b not in sched.waiting and b.num_pending_tokens == 0 and kept == {a.seq_id: TOKEN, b.seq_id: EOS}
    finished, kept = sched.on_output(step2, {a.seq_id: EOS})
    assert finished == [a] and a.completion_token_ids == [TOKEN, EOS] and a.num_pending_tokens == 0
    assert sched.is_finished() and sched.block_manager.num_free_blocks == 2


def test_overlap_drops_the_token_of_a_step_launched_after_a_stop():
    sched = make_scheduler()
    a = request(5, max_tokens=10)
    sched.add(a)
    step1 = sched.schedule()
    sched.on_launch(step1)
    step2 = sched.schedule()
    sched.on_launch(step2)
    assert sched.on_output(step1, {a.seq_id: EOS})[0] == [a]
    assert sched.on_output(step2, {a.seq_id: TOKEN}) == ([], {})  # launched before the stop was known
    assert a.completion_token_ids == [EOS] and sched.block_manager.num_free_blocks == 64


def test_overlap_never_schedules_past_max_tokens():
    sched = make_scheduler()
    a = request(5, max_tokens=2)
    sched.add(a)
    step1 = sched.schedule()
    sched.on_launch(step1)
    step2 = sched.schedule()       # the decode that samples token 2
    sched.on_launch(step2)
    assert sched.schedule().seqs == []   # token 2 is the last: nothing more to launch
    sched.on_output(step1, {a.seq_id: TOKEN})
    assert sched.on_output(step2, {a.seq_id: TOKEN})[0] == [a] and a.finish_reason == "length"
