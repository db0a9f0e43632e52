"""build_step_inputs on scheduled batches: the leading decode rows are filled as a group
(one token each, the pending ones deferred); that must build exactly what the per-row
path builds for the same rows."""
from dataclasses import fields, is_dataclass

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.input_batch import _block_tables, decode_units, build_step_inputs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from tests.unit.test_scheduler import TOKEN, make_scheduler, request


def assert_same(a, b, where: str = "StepInputs") -> None:
    """Field by field, tensors by dtype, shape and value."""
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{where}.{f.name}: {x} != {y}"
        elif is_dataclass(x):
            assert_same(x, y, f"{where}.{f.name}")
        else:
            assert x == y, f"{where}.{f.name}: {x} != {y}"


def test_decode_rows_build_what_the_per_row_path_builds():
    """Overlap steps (pending ids deferred), steps after the ids arrived, mixed decode +
    prefill-chunk steps and preemption, each built twice: with the batch's decode rows,
    and with every row through the per-row path (num_decodes=0)."""
    sched = make_scheduler(num_blocks=12, block_size=16, max_num_seqs=6, max_num_batched_tokens=40)
    for n in (5, 30, 16, 47, 3, 20, 9):
        sched.add(request(n, max_tokens=12, ignore_eos=True))
    in_flight, seen = None, set()
    for i in range(60):
        if i % 3 == 2 and in_flight is not None:  # now and then the ids arrive before the next step
            sched.on_output(in_flight[0], {seq.seq_id: TOKEN for seq in in_flight[1]})
            in_flight = None
        batch = sched.schedule()
        if not batch.seqs:
            break
        prev_rows = {seq.seq_id: row for row, seq in enumerate(in_flight[1])} if in_flight else {}
        inputs = build_step_inputs(batch, 16, frozenset({1}), prev_rows)
        per_row = ScheduledBatch(batch.seqs, batch.num_scheduled_tokens, num_decodes=0)
        assert_same(inputs, build_step_inputs(per_row, 16, frozenset({1}), prev_rows))
        seen.add((batch.num_decodes == len(batch), batch.num_decodes > 0, inputs.deferred_index is not None))
        sampling = sched.on_launch(batch)
        if in_flight is not None:
            sched.on_output(in_flight[0], {seq.seq_id: TOKEN for seq in in_flight[1]})
        in_flight = batch, sampling
    # all-decode steps with and without pending ids, and mixed steps, were compared
    assert {(True, True, True), (True, True, False), (False, True, True)} <= seen, seen
    assert sched.num_preemptions > 0


def test_block_tables_are_padded_with_minus_one():
    seqs = [Sequence([1, 2], SamplingParams()) for _ in range(3)]
    for seq, table in zip(seqs, ([3, 1], [], [7, 8, 9])):
        seq.block_table = table
    block_tables = _block_tables(seqs)
    assert block_tables.dtype == np.int32 and block_tables.tolist() == [[3, 1, -1], [-1, -1, -1], [7, 8, 9]]


def test_decode_units_without_sharing_are_the_decode_rows_longest_context_first():
    """The decode kernel starts its programs in `decode_units` order: with no blocks shared
    (or unit size 1), each decode row (all rows of a decode step, the leading ones of a mixed
    step) alone, by context length, longest first, ties in batch order; a step without decode
    rows has none."""
    sched = make_scheduler(num_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=64)
    for n in (5, 30, 16, 30, 3):
        sched.add(request(n, max_tokens=6, ignore_eos=True))
    kinds = set()
    for _ in range(40):
        batch = sched.schedule()
        if not batch.seqs:
            break
        for unit_size in (1, 8):
            meta = build_step_inputs(batch, 16, unit_size=unit_size).meta
            rows = len(batch) if meta.is_decode else meta.num_decodes
            kinds.add((meta.is_decode, meta.num_decodes > 0))
            if rows == 0:
                assert meta.decode_units is None and meta.decode_shared_lens is None
                continue
            lens = meta.context_lens[:rows].tolist()
            expected = sorted(range(rows), key=lambda i: (-lens[i], i))
            units = meta.decode_units
            assert units.dtype == torch.int32 and units.shape == (rows, unit_size)
            assert units[:, 0].tolist() == expected and (units[:, 1:] == -1).all()
            assert meta.decode_shared_lens.tolist() == [0] * rows
            if meta.num_decodes:  # the mixed step's decode half carries them, its prefill half does not
                decode, prefill = meta.split
                assert decode.decode_units is meta.decode_units and prefill.decode_units is None
        sched.on_output(batch, {seq.seq_id: TOKEN for seq in sched.on_launch(batch)})
    assert {(True, False), (False, True), (False, False)} <= kinds, kinds


def check_units(units: torch.Tensor, shared_lens: torch.Tensor, tables: np.ndarray, lens: np.ndarray,
                block_size: int, unit_size: int) -> list[list[int]]:
    """The invariants the decode kernel relies on; returns the units as lists of rows."""
    rows = len(lens)
    assert units.shape == (rows, unit_size) and shared_lens.shape == (rows,)
    groups = [[r for r in u if r >= 0] for u in units.tolist()]
    assert all(u[:len(g)] == g for u, g in zip(units.tolist(), groups)), "members first, -1 after"
    assert sorted(r for g in groups for r in g) == list(range(rows)), "every row in exactly one unit"
    n = sum(1 for g in groups if g)
    assert all(groups[:n]) and not any(groups[n:]), "units first, empty slots after"
    works = []
    for g, shared in zip(groups[:n], shared_lens.tolist()):
        assert shared % block_size == 0 and (shared == 0) == (len(g) == 1)
        for r in g:  # the shared keys lie in whole blocks the members all hold, before their newest key
            assert shared <= (lens[r] - 1) // block_size * block_size
            assert (tables[r, :shared // block_size] == tables[g[0], :shared // block_size]).all()
        works.append(shared + sum(int(lens[r]) - shared for r in g))
    assert works == sorted(works, reverse=True), "longest work first"
    return groups[:n]


def test_decode_units_group_rows_that_share_leading_blocks():
    """Four samples of one prompt (3 shared blocks); three prompts behind one cached prefix of
    2 blocks, two of them 2 blocks more; two loners. Rows that share blocks are cut into
    units of the unit size, and a unit shares the blocks all its members hold."""
    bs = 16
    tables = [[1, 2, 3, 10 + i] for i in range(4)] + [[5, 6, 20], [5, 6, 7, 8, 21], [5, 6, 7, 8, 22]] \
        + [[30, 31], [40]]
    lens = np.array([4 * bs - 3 + i for i in range(4)] + [3 * bs, 5 * bs - 1, 4 * bs + 2, 2 * bs, 9], dtype=np.int32)
    padded = np.full((len(tables), 5), -1, dtype=np.int32)
    for r, t in enumerate(tables):
        padded[r, :len(t)] = t
    for unit_size, expected, shared_blocks in (
            (8, [[0, 1, 2, 3], [4, 5, 6], [7], [8]], {0: 3, 4: 2, 7: 0, 8: 0}),
            (2, [[0, 1], [2, 3], [4], [5, 6], [7], [8]], {0: 3, 2: 3, 4: 0, 5: 4, 7: 0, 8: 0})):
        units, shared = decode_units(padded, lens, bs, unit_size)
        groups = check_units(units, shared, padded, lens, bs, unit_size)
        assert sorted(map(sorted, groups)) == expected
        assert dict(zip(map(min, groups), shared.tolist())) == {r: b * bs for r, b in shared_blocks.items()}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 60)), min_size=1, max_size=24),
       st.integers(1, 8))
def test_decode_units_hold_their_invariants(rows, unit_size):
    """Random tables drawn from a small prefix tree (shared first and second blocks), then
    own blocks: the units always keep the kernel's invariants."""
    bs, next_own = 16, iter(range(1000, 2000))
    tables, lens = [], []
    for a, b, own_keys in rows:
        shared = [a, 100 + 4 * a + b][:(a > 0) + (a > 0 and b > 0)]  # 0, 1 or 2 shared blocks
        num_keys = len(shared) * bs + own_keys
        tables.append(shared + [next(next_own) for _ in range(-(-num_keys // bs) - len(shared))])
        lens.append(num_keys)
    padded = np.full((len(tables), max(map(len, tables))), -1, dtype=np.int32)
    for r, t in enumerate(tables):
        padded[r, :len(t)] = t
    lens = np.array(lens, dtype=np.int32)
    units, shared = decode_units(padded, lens, bs, unit_size)
    groups = check_units(units, shared, padded, lens, bs, unit_size)
    assert max(map(len, groups)) <= unit_size


def test_decode_steps_group_the_samples_of_one_prompt():
    """Four requests with one 40-token prompt (as n=4 samples are) end up holding the same
    two full blocks once the prefix cache dedupes them; from then on every decode step puts
    them in one unit sharing 32 keys, and the other requests alone."""
    sched = make_scheduler(num_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(500, 540))
    twins = [request(40, max_tokens=8, ignore_eos=True, token_ids=prompt) for _ in range(4)]
    for seq in twins + [request(40, max_tokens=8, ignore_eos=True), request(20, max_tokens=8, ignore_eos=True)]:
        sched.add(seq)
    twin_ids, grouped = {seq.seq_id for seq in twins}, 0
    for _ in range(20):
        batch = sched.schedule()
        if not batch.seqs:
            break
        meta = build_step_inputs(batch, 16, unit_size=8).meta
        if meta.is_decode:
            units = [[batch.seqs[r].seq_id for r in u if r >= 0] for u in meta.decode_units.tolist()]
            shared = dict(zip(map(tuple, units), meta.decode_shared_lens.tolist()))
            if any(set(u) == twin_ids for u in units):
                grouped += 1
                assert shared[next(tuple(u) for u in units if set(u) == twin_ids)] == 32
                assert all(len(u) == 1 and shared[tuple(u)] == 0 for u in units if u and set(u) != twin_ids)
        sched.on_output(batch, {seq.seq_id: TOKEN for seq in sched.on_launch(batch)})
    assert grouped >= 5, grouped
