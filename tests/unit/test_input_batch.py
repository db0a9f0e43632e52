"""build_step_inputs on scheduled batches: the leading decode rows are filled as a group
(one token each, the pending ones deferred); that must build exactly what the per-row
path builds for the same rows."""
from dataclasses import fields, is_dataclass

import numpy as np
import torch

from nanovllm.engine.input_batch import _block_tables, build_step_inputs
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


def test_decode_order_is_the_decode_rows_longest_context_first():
    """The decode kernel starts its programs in `decode_order`: the decode rows (all rows of
    a decode step, the leading ones of a mixed step) by context length, longest first,
    ties in batch order; a step without decode rows has none."""
    sched = make_scheduler(num_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=64)
    for n in (5, 30, 16, 30, 3):
        sched.add(request(n, max_tokens=6, ignore_eos=True))
    kinds = set()
    for _ in range(40):
        batch = sched.schedule()
        if not batch.seqs:
            break
        meta = build_step_inputs(batch, 16).meta
        rows = len(batch) if meta.is_decode else meta.num_decodes
        kinds.add((meta.is_decode, meta.num_decodes > 0))
        if rows == 0:
            assert meta.decode_order is None
        else:
            lens = meta.context_lens[:rows].tolist()
            expected = sorted(range(rows), key=lambda i: (-lens[i], i))
            assert meta.decode_order.dtype == torch.int32 and meta.decode_order.tolist() == expected
            if meta.num_decodes:  # the mixed step's decode half carries it, its prefill half does not
                decode, prefill = meta.split
                assert decode.decode_order is meta.decode_order and prefill.decode_order is None
        sched.on_output(batch, {seq.seq_id: TOKEN for seq in sched.on_launch(batch)})
    assert {(True, False), (False, True), (False, False)} <= kinds, kinds
