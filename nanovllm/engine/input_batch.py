"""Turn a scheduled batch into the flat tensors one forward pass takes.

They are built on the host (rank 0 ships them to tensor-parallel workers as they are),
then moved to the device with one non-blocking copy per tensor."""
import itertools
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from nanovllm.engine.sampling_batch import build_sampling_tensors
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import SamplingTensors
from nanovllm.utils.context import AttentionMetadata

ALIGN = 16  # bytes: every tensor in the staging buffer starts aligned for any dtype


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor        # [num_tokens] int64
    positions: torch.Tensor        # [num_tokens] int64
    meta: AttentionMetadata
    sampling_seq_ids: list[int]    # the sequences that sample this step, in logits order
    sampling: SamplingTensors      # per sampling sequence: temperature, top-k/p, penalties, seeds...
    # overlap scheduling: input ids the host does not know yet, taken on the device from
    # the previous step's sampled ids: input_ids[deferred_index] = prev_sampled[deferred_prev_row]
    deferred_index: torch.Tensor | None = None      # [num_deferred] int64
    deferred_prev_row: torch.Tensor | None = None   # [num_deferred] int64

    def to(self, device: torch.device) -> "StepInputs":
        """Every tensor on `device`, through one pinned staging buffer and one copy (a
        copy per tensor would cost a launch each on the host's critical path)."""
        if device.type == "cpu":
            return self
        tensors, offsets, total = list(_tensors(self)), [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        staging = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=True)
        for t, start in zip(tensors, offsets):
            staging[start:start + t.numel() * t.element_size()].view(t.dtype).copy_(t.reshape(-1))
        on_device = staging.to(device, non_blocking=True)
        views = iter(on_device[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                     for t, start in zip(tensors, offsets))
        return _map_tensors(self, lambda t: next(views))


def _tensors(obj):
    """Every tensor field of a (nested) frozen dataclass, in `_map_tensors`' order."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "__dataclass_fields__"):
            yield from _tensors(value)


def _map_tensors(obj, fn):
    """Apply `fn` to every tensor field of a (nested) frozen dataclass."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = fn(value)
        elif hasattr(value, "__dataclass_fields__"):
            changes[f.name] = _map_tensors(value, fn)
    return replace(obj, **changes)


def build_step_inputs(batch: ScheduledBatch, block_size: int, eos_token_ids: frozenset[int] = frozenset(),
                      prev_rows: dict[int, int] | None = None, unit_size: int = 1) -> StepInputs:
    """Host tensors for one step (`.to(device)` moves them). Sequence i contributes its
    tokens [num_computed, num_computed + n_i): queries at those positions, keys
    0 .. num_computed + n_i - 1 (the new ones stored first).

    A decode whose input token is still pending (sampled by the previous step, see
    `Sequence.num_pending_tokens`) reads it on the device: `prev_rows` maps seq_id to
    its row in the previous step's sampled ids. unit_size: the most decode rows that may
    share one read of their common prefix (`decode_unit_size`; 1: none share)."""
    seqs = batch.seqs
    num_seqs = len(seqs)
    counts = np.asarray(batch.num_scheduled_tokens, dtype=np.int64)
    starts = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=num_seqs)
    cu_q = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(counts, out=cu_q[1:])
    context_lens = (starts + counts).astype(np.int32)
    cu_k = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(context_lens, out=cu_k[1:])

    input_ids, deferred_index, deferred_prev_row = _input_ids(batch, starts, cu_q, prev_rows)
    block_tables = _block_tables(seqs)

    num_tokens = len(input_ids)
    seq_index = np.repeat(np.arange(num_seqs), counts)              # [num_tokens]
    positions = np.arange(num_tokens) - cu_q[seq_index] + starts[seq_index]
    slot_mapping = block_tables[seq_index, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size

    # NOTE: a decode row computes its sequence's one uncomputed token, so it samples; a
    # prefill row samples only with the chunk that completes its prompt
    samples = list(range(batch.num_decodes))
    samples += [i for i in range(batch.num_decodes, num_seqs) if context_lens[i] == len(seqs[i])]
    logits_indices = cu_q[1:][samples].astype(np.int64) - 1
    sampling = build_sampling_tensors([seqs[i] for i in samples], eos_token_ids)

    # a mixed step's leading one-token rows (the decodes) attend through the decode kernel
    num_decodes = int(np.argmax(counts != 1)) if (counts != 1).any() else 0
    is_decode = bool((counts == 1).all())
    decode_rows = num_seqs if is_decode else num_decodes
    units = decode_units(block_tables[:decode_rows], context_lens[:decode_rows], block_size, unit_size) \
        if decode_rows else (None, None)
    prefill = {}
    if num_decodes:
        d = num_decodes
        prefill = dict(num_decodes=d, prefill_cu_seqlens_q=torch.from_numpy(cu_q[d:] - cu_q[d]),
                       prefill_cu_seqlens_k=torch.from_numpy(cu_k[d:] - cu_k[d]),
                       prefill_max_seqlen_q=int(counts[d:].max()), prefill_has_cached_kv=bool((starts[d:] > 0).any()))
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slot_mapping),
        cu_seqlens_q=torch.from_numpy(cu_q),
        cu_seqlens_k=torch.from_numpy(cu_k),
        max_seqlen_q=int(counts.max()),
        max_seqlen_k=int(context_lens.max()),
        context_lens=torch.from_numpy(context_lens),
        block_tables=torch.from_numpy(block_tables),
        logits_indices=torch.from_numpy(logits_indices),
        is_decode=is_decode,
        has_cached_kv=bool((starts > 0).any()),
        decode_units=units[0],
        decode_shared_lens=units[1],
        **prefill,
    )
    deferred = (torch.from_numpy(np.asarray(deferred_index, dtype=np.int64)),
                torch.from_numpy(np.asarray(deferred_prev_row, dtype=np.int64))) if deferred_index else (None, None)
    return StepInputs(torch.from_numpy(input_ids), torch.from_numpy(positions), meta,
                      [seqs[i].seq_id for i in samples], sampling, *deferred)


def _input_ids(batch: ScheduledBatch, starts: np.ndarray, cu_q: np.ndarray, prev_rows: dict[int, int] | None
               ) -> tuple[np.ndarray, list[int], list[int]]:
    """[num_tokens] the ids each row computes, and the deferred (index, previous row)
    pairs: a pending id is not on the host, so its place holds 0 until the device fills it."""
    input_ids = np.empty(int(cu_q[-1]), dtype=np.int64)
    deferred_index, deferred_prev_row = [], []
    # the leading decode rows, one token each (row i is token i): the sequence's last
    # token, pending when the previous step sampled it
    decode_ids = []
    for i, seq in enumerate(batch.seqs[:batch.num_decodes]):
        if seq.num_pending_tokens:
            decode_ids.append(0)
            deferred_index.append(i)
            deferred_prev_row.append(prev_rows[seq.seq_id])
        else:
            decode_ids.append(seq.token_ids[-1])
    input_ids[:batch.num_decodes] = decode_ids
    for i in range(batch.num_decodes, len(batch.seqs)):
        seq, start = batch.seqs[i], int(starts[i])
        if start < len(seq.token_ids):
            input_ids[cu_q[i]:cu_q[i + 1]] = seq.token_ids[start:start + batch.num_scheduled_tokens[i]]
        else:  # a decode of the pending token (only ever the last one, one per sequence)
            input_ids[cu_q[i]] = 0
            deferred_index.append(int(cu_q[i]))
            deferred_prev_row.append(prev_rows[seq.seq_id])
    return input_ids, deferred_index, deferred_prev_row


def _block_tables(seqs: list[Sequence]) -> np.ndarray:
    """[num_seqs, max_blocks] int32: each sequence's block table, padded with -1."""
    tables = [seq.block_table for seq in seqs]
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    block_tables = np.full((len(tables), int(lengths.max())), -1, dtype=np.int32)
    # the mask's cells in row-major order are row 0's first lengths[0], then row 1's, ...:
    # exactly the order of the concatenated tables
    in_table = np.arange(block_tables.shape[1]) < lengths[:, None]
    block_tables[in_table] = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32,
                                         count=int(lengths.sum()))
    return block_tables


def decode_units(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int, unit_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the decode rows into units of up to unit_size rows that hold the same leading
    blocks (see `AttentionMetadata.decode_units`): ([rows, unit_size] int32 units, -1 padded,
    longest work first; [rows] int32 keys each unit shares)."""
    rows = len(context_lens)
    units = np.full((rows, max(unit_size, 1)), -1, dtype=np.int32)
    shared_lens = np.zeros(rows, dtype=np.int32)
    # a row may share its blocks before the one holding its newest key (that one is its own)
    shareable = (context_lens.astype(np.int64) - 1) // block_size
    firsts = np.sort(block_tables[shareable > 0, 0])
    if unit_size < 2 or not (firsts[1:] == firsts[:-1]).any():  # no two rows share a block: each alone
        units[:, 0] = np.argsort(-context_lens, kind="stable")  # longest first; ties in batch order
        return torch.from_numpy(units), torch.from_numpy(shared_lens)
    order = np.lexsort(block_tables[:, ::-1].T)  # sorted by table: equal leading blocks side by side
    tables, limit = block_tables[order], shareable[order]
    same = (tables[1:] == tables[:-1]) & (np.arange(tables.shape[1]) < np.minimum(limit[1:], limit[:-1])[:, None])
    # links[k]: leading blocks sorted row k shares with row k - 1 (the first row: none)
    links = np.zeros(rows, dtype=np.int64)
    links[1:] = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    # runs of sorted rows linked by shared blocks, cut into units of unit_size; a unit shares
    # the fewest blocks of its links
    new_run = links == 0
    run_of = np.cumsum(new_run) - 1
    unit_start = (np.arange(rows) - np.flatnonzero(new_run)[run_of]) % unit_size == 0
    starts = np.flatnonzero(unit_start)
    unit_of = np.cumsum(unit_start) - 1
    links[unit_start] = np.iinfo(np.int64).max
    shared = np.minimum.reduceat(links, starts)
    sizes = np.diff(starts, append=rows)
    shared[sizes == 1] = 0
    shared *= block_size
    # keys a unit's programs read: the shared ones once, then each member's own
    work = np.bincount(unit_of, weights=context_lens[order], minlength=len(starts)) - (sizes - 1) * shared
    slot = np.empty(len(starts), dtype=np.int64)  # longest work first (stable: deterministic)
    slot[np.argsort(-work, kind="stable")] = np.arange(len(starts))
    units[slot[unit_of], np.arange(rows) - starts[unit_of]] = order
    shared_lens[slot] = shared
    return torch.from_numpy(units), torch.from_numpy(shared_lens)
