"""BlockManager: reference counts, the prefix cache and its eviction order, exactly.

Block ids and eviction orders below follow from the rules: fresh blocks come off the
front of the free list (initially 0, 1, 2, ...); a freed block without a hash goes to the
front, a freed hashed block to the back (least recently freed is evicted first); a
sequence frees its blocks tail first."""
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nanovllm.engine import block_manager as bm_module
from nanovllm.engine.block_manager import NO_HASH, BlockManager, chain_hash
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from tests.conftest import fuzz_examples

BLOCK_SIZES = [16, 32, 256]
PARAMS = SamplingParams(temperature=0, max_tokens=16)


def seq_of(token_ids: list[int]) -> Sequence:
    return Sequence(token_ids, PARAMS)


def tokens(num: int, start: int = 0) -> list[int]:
    """`num` distinct token ids from `start`: prompts built from different starts share nothing."""
    return list(range(start, start + num))


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """What a step does to a sequence: compute its next tokens (default: all), then commit."""
    seq.num_computed_tokens += seq.num_uncomputed_tokens if num_tokens is None else num_tokens
    bm.commit(seq)


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chain hashes of every full block, computed independently of the manager."""
    hashes, parent = [], NO_HASH
    for i in range(len(token_ids) // block_size):
        # through the module, so it follows a monkeypatched (colliding) hash
        parent = bm_module.chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def ref_counts(bm: BlockManager, block_ids) -> list[int]:
    return [bm.blocks[b].ref_count for b in block_ids]


class FakeKV:
    """A stand-in for the KV cache: slot -> the token prefix that produced it (a token's
    K/V depends on everything before it). `check` proves every computed token of every
    live sequence reads the K/V of its own prefix: catches a hit on a block whose KV was
    never computed, a block at the wrong position, or one that was evicted while in use."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def write(self, seq: Sequence, start: int, stop: int) -> None:
        for pos in range(start, stop):
            slot = (seq.block_table[pos // self.block_size], pos % self.block_size)
            self.slots[slot] = tuple(seq.token_ids[:pos + 1])

    def check(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            for pos in range(seq.num_computed_tokens):
                slot = (seq.block_table[pos // self.block_size], pos % self.block_size)
                assert self.slots.get(slot) == tuple(seq.token_ids[:pos + 1]), (seq.seq_id, pos, slot)


# ---- allocation and registration ------------------------------------------------------

@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_fresh_allocation_takes_lowest_ids(bs):
    bm = BlockManager(8, bs)
    a = seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    assert a.block_table == [0, 1, 2]
    assert (a.num_computed_tokens, a.num_cached_tokens) == (0, 0)
    assert bm.num_free_blocks == 5 and list(bm.free_block_ids) == [3, 4, 5, 6, 7]
    assert bm.hash_to_block == {}  # nothing is computed yet, so nothing is registered
    bm.check_integrity([a])


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_commit_registers_only_full_computed_blocks(bs):
    bm = BlockManager(8, bs)
    prompt = tokens(2 * bs + 5)
    a = seq_of(prompt)
    bm.allocate(a)
    h0, h1 = prefix_hashes(prompt, bs)

    compute(bm, a, bs - 1)  # block 0 is one token short of computed
    assert bm.hash_to_block == {}
    compute(bm, a, 1)
    assert bm.hash_to_block == {h0: 0}
    assert bm.blocks[0].hash == h0 and bm.blocks[0].token_ids == tuple(prompt[:bs])
    compute(bm, a)  # the rest: block 1 is full, block 2 (5 tokens) never gets a hash
    assert bm.hash_to_block == {h0: 0, h1: 1}
    assert bm.blocks[1].token_ids == tuple(prompt[bs:2 * bs])
    assert bm.blocks[2].hash == NO_HASH
    bm.check_integrity([a])


def test_chain_hash_depends_on_the_parent():
    block = tokens(16)
    assert chain_hash(NO_HASH, block) != chain_hash(chain_hash(NO_HASH, block), block)
    assert chain_hash(NO_HASH, block) == chain_hash(NO_HASH, list(block))


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_no_hit_on_blocks_not_yet_computed(bs):
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(2 * bs + 5)), seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    compute(bm, a, bs - 1)
    bm.allocate(b)
    assert b.block_table == [3, 4, 5] and b.num_cached_tokens == 0


# ---- hits ------------------------------------------------------------------------------

@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_full_hit_shares_blocks(bs):
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(2 * bs + 5)), seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    compute(bm, a)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    assert b.num_cached_tokens == b.num_computed_tokens == 2 * bs
    assert ref_counts(bm, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert bm.num_free_blocks == 4
    bm.check_integrity([a, b])


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_partial_hit(bs):
    bm = BlockManager(8, bs)
    a = seq_of(tokens(2 * bs + 5))
    b = seq_of(tokens(bs) + tokens(bs + 3, start=10_000))  # same first block only
    bm.allocate(a)
    compute(bm, a)
    bm.allocate(b)
    assert b.block_table == [0, 3, 4]
    assert b.num_cached_tokens == b.num_computed_tokens == bs
    assert ref_counts(bm, [0, 1]) == [2, 1]


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_miss_when_an_earlier_block_differs(bs):
    """Equal second blocks behind different first blocks are different prefixes."""
    bm = BlockManager(8, bs)
    second = tokens(bs + 5, start=bs)
    a, b = seq_of(tokens(bs) + second), seq_of(tokens(bs, start=10_000) + second)
    bm.allocate(a)
    compute(bm, a)
    bm.allocate(b)
    assert b.block_table == [3, 4, 5] and b.num_cached_tokens == 0


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_last_token_is_never_a_hit(bs):
    """A fully cached prompt that is a multiple of the block size still computes its last
    block; once computed, commit swaps that block for the registered twin."""
    bm = BlockManager(8, bs)
    prompt = tokens(2 * bs)
    a, b = seq_of(prompt), seq_of(prompt)
    bm.allocate(a)
    compute(bm, a)
    assert bm.hash_to_block == dict(zip(prefix_hashes(prompt, bs), [0, 1]))

    bm.allocate(b)
    assert b.block_table == [0, 2]
    assert b.num_cached_tokens == b.num_computed_tokens == bs
    assert b.num_uncomputed_tokens == bs  # including the last token, which samples
    compute(bm, b)
    assert b.block_table == [0, 1]  # deduped
    assert ref_counts(bm, [0, 1, 2]) == [2, 2, 0]
    assert list(bm.free_block_ids)[0] == 2  # the unhashed copy is reused first
    bm.check_integrity([a, b])


@pytest.mark.parametrize("bs", [16, 32])
def test_one_block_prompt_has_no_hit(bs):
    bm = BlockManager(4, bs)
    a, b = seq_of(tokens(bs)), seq_of(tokens(bs))
    bm.allocate(a)
    compute(bm, a)
    bm.allocate(b)
    assert b.block_table == [1] and b.num_cached_tokens == 0


@pytest.mark.parametrize("bs", [16, 32])
def test_hit_on_prompt_one_token_past_the_blocks(bs):
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(2 * bs + 1)), seq_of(tokens(2 * bs + 1))
    bm.allocate(a)
    compute(bm, a)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3] and b.num_uncomputed_tokens == 1


# ---- eviction and revival ----------------------------------------------------------------

@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_freed_blocks_are_evicted_tail_first_lru(bs):
    bm = BlockManager(4, bs)
    prompt_a = tokens(2 * bs + 5)
    h0, h1 = prefix_hashes(prompt_a, bs)
    a = seq_of(prompt_a)
    bm.allocate(a)  # [0, 1, 2]; free: [3]
    compute(bm, a)
    bm.free(a)
    # the unhashed tail block 2 goes to the front; hashed 1 then 0 to the back
    assert list(bm.free_block_ids) == [2, 3, 1, 0]
    assert bm.hash_to_block == {h0: 0, h1: 1}  # freed blocks stay cached
    assert (a.block_table, a.num_computed_tokens) == ([], 0)

    b = seq_of(tokens(2 * bs + 5, start=10_000))
    bm.allocate(b)
    assert b.block_table == [2, 3, 1]  # evicts A's tail block 1, keeps its head block 0
    assert bm.hash_to_block == {h0: 0}
    assert bm.blocks[1].hash == NO_HASH and bm.blocks[1].token_ids == ()
    bm.check_integrity([b])

    bm.free(b)
    again = seq_of(prompt_a)
    bm.allocate(again)
    assert again.block_table[0] == 0 and again.num_cached_tokens == bs  # block 1's hash is gone


@pytest.mark.parametrize("bs", [16, 32])
def test_least_recently_freed_sequence_is_evicted_first(bs):
    bm = BlockManager(6, bs)
    a, b = seq_of(tokens(bs + 1)), seq_of(tokens(bs + 1, start=10_000))
    for seq in (a, b):
        bm.allocate(seq)
        compute(bm, seq)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    bm.free(a)
    bm.free(b)
    assert list(bm.free_block_ids) == [3, 1, 4, 5, 0, 2]
    c = seq_of(tokens(5 * bs, start=20_000))  # needs 5 blocks: all but B's block 2
    bm.allocate(c)
    assert c.block_table == [3, 1, 4, 5, 0]
    assert list(bm.hash_to_block.values()) == [2]


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_hit_revives_a_freed_cached_block(bs):
    bm = BlockManager(3, bs)
    prompt = tokens(2 * bs + 5)
    a = seq_of(prompt)
    bm.allocate(a)
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 3

    b = seq_of(prompt)
    assert bm.can_allocate(b)  # 2 revived + 1 fresh == 3 free
    bm.allocate(b)
    assert b.block_table == [0, 1, 2] and b.num_cached_tokens == 2 * bs
    assert bm.num_free_blocks == 0 and ref_counts(bm, [0, 1, 2]) == [1, 1, 1]
    assert not bm.can_allocate(seq_of(tokens(1, start=10_000)))
    bm.check_integrity([b])


@pytest.mark.parametrize("bs", [16, 32])
def test_can_allocate_counts_revived_hits_as_taken(bs):
    bm = BlockManager(4, bs)
    prompt = tokens(2 * bs + 5)
    a = seq_of(prompt)
    bm.allocate(a)
    compute(bm, a)
    bm.free(a)  # free: [2, 3, 1, 0], with 1 and 0 cached
    c = seq_of(tokens(2 * bs, start=10_000))
    bm.allocate(c)
    assert c.block_table == [2, 3]
    # A's prompt would revive 0 and 1 and need one fresh block: 3 of the 2 free
    assert not bm.can_allocate(seq_of(prompt))
    assert bm.can_allocate(seq_of(prompt[:2 * bs]))  # 1 revived + 1 fresh


@pytest.mark.parametrize("bs", [16, 32])
def test_can_allocate_counts_shared_hits_as_free(bs):
    bm = BlockManager(4, bs)
    prompt = tokens(2 * bs + 5)
    a = seq_of(prompt)
    bm.allocate(a)
    compute(bm, a)
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(seq_of(prompt))  # 2 live hits cost nothing, 1 fresh block
    assert not bm.can_allocate(seq_of(tokens(2 * bs + 5, start=10_000)))


# ---- collisions ---------------------------------------------------------------------------

@pytest.fixture
def colliding_hash(monkeypatch):
    """Every block hashes to the same value: only the token check tells blocks apart."""
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, token_ids: 42)


def test_collision_with_other_tokens_is_rejected(colliding_hash):
    bs = 16
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(bs + 5)), seq_of(tokens(bs + 5, start=10_000))
    bm.allocate(a)
    compute(bm, a)
    assert bm.hash_to_block == {42: 0}
    bm.allocate(b)
    assert b.block_table == [2, 3] and b.num_cached_tokens == 0  # verification rejects the hit
    compute(bm, b)
    # B's block collides with different tokens: neither registered nor swapped
    assert b.block_table == [2, 3] and bm.hash_to_block == {42: 0}
    assert bm.blocks[2].hash == NO_HASH
    bm.check_integrity([a, b])


def test_collision_with_same_tokens_at_another_position_is_rejected(colliding_hash):
    """[T, T, x]: under a collision, block 1 (T at positions 16..31) is not block 0 (T at
    0..15); their K/V differ."""
    bs = 16
    repeated = tokens(bs) + tokens(bs) + [7]
    bm = BlockManager(8, bs)
    kv = FakeKV(bs)
    a = seq_of(repeated)
    bm.allocate(a)
    kv.write(a, 0, len(a))
    compute(bm, a)
    assert len(set(a.block_table)) == 3, a.block_table
    kv.check([a])
    b = seq_of(repeated)
    bm.allocate(b)
    assert b.block_table[:1] == [0] and b.num_cached_tokens == bs, b.block_table


# ---- dedupe of identical prompts ---------------------------------------------------------

@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_identical_prompts_in_one_step_are_deduped(bs):
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(2 * bs + 5)), seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    bm.allocate(b)  # same step: A has not computed anything, so no hit
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    compute(bm, a)
    compute(bm, b)
    assert b.block_table == [0, 1, 5]
    assert ref_counts(bm, range(6)) == [2, 2, 1, 0, 0, 1]
    assert list(bm.free_block_ids) == [4, 3, 6, 7]  # released copies go to the front
    assert bm.hash_to_block == dict(zip(prefix_hashes(a.token_ids, bs), [0, 1]))
    bm.check_integrity([a, b])


@pytest.mark.parametrize("bs", [16, 32])
def test_dedupe_follows_chunked_prefill(bs):
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(2 * bs + 5)), seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    bm.allocate(b)
    compute(bm, a, bs)
    compute(bm, b, bs)
    assert b.block_table == [0, 4, 5]
    compute(bm, b, bs)  # B registers block 1 first this time; A will swap onto it
    compute(bm, a, bs)
    assert (a.block_table, b.block_table) == ([0, 4, 2], [0, 4, 5])
    assert ref_counts(bm, range(6)) == [2, 0, 1, 0, 2, 1]
    bm.check_integrity([a, b])


@pytest.mark.parametrize("bs", [16, 32])
def test_dedupe_revives_a_freed_twin(bs):
    """A registers and finishes before B (allocated alongside it) computes: B's commit
    swaps onto A's freed, still cached block."""
    bm = BlockManager(8, bs)
    a, b = seq_of(tokens(bs + 5)), seq_of(tokens(bs + 5))
    bm.allocate(a)
    bm.allocate(b)
    compute(bm, a)
    bm.free(a)
    compute(bm, b)
    assert b.block_table == [0, 3]
    assert ref_counts(bm, range(4)) == [1, 0, 0, 1]
    assert 0 not in bm.free_block_ids
    bm.check_integrity([b])


# ---- decode growth, preemption and limits --------------------------------------------------

@pytest.mark.parametrize("bs", [16, 32])
def test_append_slots_adds_a_block_only_at_a_boundary(bs):
    bm = BlockManager(3, bs)
    a = seq_of(tokens(bs))
    bm.allocate(a)
    compute(bm, a)
    a.token_ids.append(99)  # the sampled token needs a second block
    assert bm.can_append(a)
    bm.append_slots(a)
    assert a.block_table == [0, 1]
    compute(bm, a)
    for t in range(bs - 1):  # fills block 1: no new block
        a.token_ids.append(t)
        bm.append_slots(a)
        compute(bm, a)
    assert a.block_table == [0, 1]
    assert bm.hash_to_block == dict(zip(prefix_hashes(a.token_ids, bs), [0, 1]))
    other = seq_of(tokens(1, start=10_000))
    bm.allocate(other)  # takes the last free block
    a.token_ids.append(5)
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError, match="out of KV cache blocks"):
        bm.append_slots(a)


@pytest.mark.parametrize("bs", [16, 32])
def test_preempted_sequence_recomputes_from_its_cached_prefix(bs):
    bm = BlockManager(8, bs)
    a = seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    compute(bm, a, bs + 3)
    bm.free(a)  # preemption: the computed full block stays cached
    assert (a.num_computed_tokens, a.num_cached_tokens, a.block_table) == (0, 0, [])
    bm.allocate(a)
    assert a.block_table == [0, 1, 2]  # the hit revives block 0; 1 and 2 were freed unhashed
    assert a.num_computed_tokens == a.num_cached_tokens == bs
    bm.check_integrity([a])


@pytest.mark.parametrize("bs", [16, 32])
def test_prefix_caching_disabled(bs):
    bm = BlockManager(8, bs, enable_prefix_caching=False)
    a, b = seq_of(tokens(2 * bs + 5)), seq_of(tokens(2 * bs + 5))
    bm.allocate(a)
    compute(bm, a)
    assert bm.hash_to_block == {} and all(blk.hash == NO_HASH for blk in bm.blocks)
    bm.allocate(b)
    assert b.block_table == [3, 4, 5] and b.num_cached_tokens == 0
    compute(bm, b)
    assert b.block_table == [3, 4, 5]  # no dedupe either
    bm.free(a)
    assert list(bm.free_block_ids) == [0, 1, 2, 6, 7]  # unhashed blocks are reused first, head first
    bm.check_integrity([b])


# ---- property: random operations never break the accounting -------------------------------

def _prompt_alphabet(bs: int) -> list[list[int]]:
    """Prompts made of a few shared blocks, so hits, shares and dedupes happen."""
    x, y, z = tokens(bs, 100), tokens(bs, 1000), tokens(bs, 2000)
    return [x + y + [1, 2, 3], x + y, x + [4], x + y + z, y + x + [5], x, [6, 7], x + y + z + [8]]


# (operation, which prompt / live sequence, how many tokens or which token); weighted
# towards allocate and compute so the small cache fills, hits and evicts
OPS = st.lists(st.tuples(
    st.sampled_from(["allocate"] * 3 + ["compute"] * 4 + ["decode"] * 2 + ["readmit", "preempt", "finish"]),
    st.integers(0, 15), st.integers(1, 40)), min_size=20, max_size=80)


def _check_state(bm: BlockManager, live: list[Sequence], kv: FakeKV) -> None:
    bm.check_integrity(live)
    held = {b for seq in live for b in seq.block_table}
    assert bm.num_free_blocks + len(held) == bm.num_blocks  # no leak
    hashed = {blk.hash: blk.block_id for blk in bm.blocks if blk.hash != NO_HASH}
    assert len(hashed) == sum(blk.hash != NO_HASH for blk in bm.blocks)  # one block per hash
    assert bm.hash_to_block == hashed  # every cached block is findable, and only those
    if not bm.enable_prefix_caching:
        assert not hashed
    for seq in live:
        assert len(seq.block_table) == seq.num_blocks(bm.block_size)
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert seq.num_cached_tokens <= seq.num_computed_tokens <= len(seq)
        chain = prefix_hashes(seq.token_ids, bm.block_size)
        for i, block_id in enumerate(seq.block_table):
            block = bm.blocks[block_id]
            if block.hash != NO_HASH:
                assert block.token_ids == tuple(seq.block_tokens(i, bm.block_size))
                assert block.hash == chain[i]
                assert (i + 1) * bm.block_size <= seq.num_computed_tokens  # registered only once computed
    kv.check(live)


def run_operations(bs: int, prefix_caching: bool, num_blocks: int, ops) -> None:
    bm = BlockManager(num_blocks, bs, prefix_caching)
    kv = FakeKV(bs)
    prompts = _prompt_alphabet(bs)
    live: list[Sequence] = []
    waiting: list[Sequence] = []
    for op, i, n in ops:
        if op in ("allocate", "readmit"):
            if op == "allocate":
                seq = seq_of(prompts[i % len(prompts)])
            elif waiting:
                seq = waiting.pop(i % len(waiting))
            else:
                continue
            if seq.num_blocks(bs) > num_blocks:
                continue
            if bm.can_allocate(seq):
                free_before = bm.num_free_blocks
                bm.allocate(seq)
                assert seq.num_computed_tokens == seq.num_cached_tokens < len(seq)
                live.append(seq)
                assert bm.num_free_blocks >= 0 and free_before >= bm.num_free_blocks
            elif op == "readmit":
                waiting.append(seq)
            else:
                bm.forget(seq)
        elif not live:
            continue
        else:
            seq = live[i % len(live)]
            if op == "compute":
                n = min(n, seq.num_uncomputed_tokens)
                kv.write(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
                compute(bm, seq, n)
            elif op == "decode" and seq.num_uncomputed_tokens == 0:
                seq.token_ids.append(n % 3)  # a tiny alphabet: decoded blocks coincide too
                if bm.can_append(seq):
                    bm.append_slots(seq)
                else:  # what the scheduler does when blocks run out
                    live.remove(seq)
                    bm.free(seq)
                    waiting.append(seq)
            elif op in ("preempt", "finish"):
                live.remove(seq)
                bm.free(seq)
                if op == "preempt":
                    waiting.append(seq)
                else:
                    bm.forget(seq)
        _check_state(bm, live, kv)
    for seq in live:
        bm.free(seq)
    _check_state(bm, [], kv)
    assert bm.num_free_blocks == num_blocks


@settings(max_examples=fuzz_examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bs=st.sampled_from([16, 32]), prefix_caching=st.booleans(), num_blocks=st.integers(4, 10), ops=OPS)
def test_random_operations_keep_invariants(bs, prefix_caching, num_blocks, ops):
    run_operations(bs, prefix_caching, num_blocks, ops)


@settings(max_examples=fuzz_examples(150), deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(bs=st.sampled_from([16, 32]), num_blocks=st.integers(4, 10), ops=OPS)
def test_random_operations_with_colliding_hashes(bs, num_blocks, ops):
    """A 2-bit hash: collisions everywhere, and every computed token must still read the
    K/V of its own prefix (FakeKV)."""
    real = bm_module.chain_hash
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bm_module, "chain_hash", lambda parent, token_ids: real(parent, token_ids) % 4)
        run_operations(bs, True, num_blocks, ops)
