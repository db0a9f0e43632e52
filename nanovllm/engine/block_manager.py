"""Paged KV-cache blocks: allocation, reference counts and the prefix cache.

Each full block of a sequence has a chained hash: xxh64(parent block's hash, the block's
token ids), so equal hashes mean equal prefixes. A block whose KV has been computed is
registered under its hash; a later sequence with the same prefix shares it (ref count + 1)
instead of recomputing it. Freed blocks keep their hash and KV and wait in an LRU free
list: a hit revives one, a fresh allocation evicts the least recently freed.
"""
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence

NO_HASH = -1


def chain_hash(parent: int, token_ids: list[int]) -> int:
    h = xxhash.xxh64()
    if parent != NO_HASH:  # the first block has no parent
        h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()   # stored to verify a hash hit against collisions
    parent_hash: int = NO_HASH        # and its position: the hash of the block before it


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # free blocks, least recently freed first; blocks without a hash sit at the front
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # per sequence: its full blocks' chain hashes and how many of its blocks are registered
        self._seq_hashes: dict[int, list[int]] = {}
        self._num_registered: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- hashing -------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chain hashes of the sequence's first `num_full_blocks` blocks (memoized: full
        blocks never change)."""
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        while len(hashes) < num_full_blocks:
            parent = hashes[-1] if hashes else NO_HASH
            hashes.append(chain_hash(parent, seq.block_tokens(len(hashes), self.block_size)))
        return hashes[:num_full_blocks]

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding the sequence's longest cached prefix."""
        if not self.enable_prefix_caching:
            return []
        # NOTE: the last token is never a prefix-cache hit: it must be computed to sample
        max_hits = (len(seq) - 1) // self.block_size
        hits, parent = [], NO_HASH
        for i, h in enumerate(self._hashes(seq, max_hits)):
            block_id = self.hash_to_block.get(h)
            if block_id is None or not self._holds(block_id, parent, seq.block_tokens(i, self.block_size)):
                break
            hits.append(block_id)
            parent = h
        return hits

    def _holds(self, block_id: int, parent: int, token_ids: list[int]) -> bool:
        """NOTE: a hash hit counts only if the block holds these tokens at this position
        (same parent hash), so a collision never shares K/V computed for another prefix."""
        block = self.blocks[block_id]
        return block.parent_hash == parent and block.token_ids == tuple(token_ids)

    # ---- allocation ----------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._match_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks(self.block_size) - len(hits) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing cached prefix blocks."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._match_prefix(seq)
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take_fresh() for _ in range(seq.num_blocks(self.block_size) - len(hits))]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self._num_registered[seq.seq_id] = len(hits)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's uncomputed tokens have slots (or one free block gives them)."""
        missing = seq.num_blocks(self.block_size) - len(seq.block_table)
        return missing <= self.num_free_blocks

    def append_slots(self, seq: Sequence) -> None:
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take_fresh())

    def free(self, seq: Sequence) -> None:
        # tail first, so the LRU list evicts a sequence's tail before its (more shared) head
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self._num_registered.pop(seq.seq_id, None)

    def forget(self, seq: Sequence) -> None:
        """Drop the memoized hashes of a sequence that will never be scheduled again."""
        self._seq_hashes.pop(seq.seq_id, None)

    # ---- prefix-cache registration -------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled and computed.

        NOTE: a block's hash is registered only after its KV exists, so a hit never reads
        KV that is still being written. If another sequence registered the same prefix
        first (identical prompts scheduled together), ours is swapped for the shared one
        and freed."""
        if not self.enable_prefix_caching:
            return
        start = self._num_registered[seq.seq_id]
        # NOTE: a block is hashed only once all its token ids are known (none pending)
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= start:  # no block filled since the last commit (most decode steps)
            return
        hashes = self._hashes(seq, full)
        for i in range(start, full):
            self._register(seq, i, hashes[i], hashes[i - 1] if i else NO_HASH)
        self._num_registered[seq.seq_id] = full

    def _register(self, seq: Sequence, i: int, h: int, parent: int) -> None:
        block = self.blocks[seq.block_table[i]]
        if block.hash == h:
            return
        tokens = seq.block_tokens(i, self.block_size)
        existing = self.hash_to_block.get(h)
        if existing is None:
            block.hash, block.token_ids, block.parent_hash = h, tuple(tokens), parent
            self.hash_to_block[h] = block.block_id
        elif self._holds(existing, parent, tokens):
            self._take(existing)  # dedupe: share the registered twin, free our copy
            seq.block_table[i] = existing
            self._release(block.block_id)

    # ---- reference counting --------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]  # revive a cached free block
        block.ref_count += 1

    def _take_fresh(self) -> int:
        if not self.free_block_ids:
            raise RuntimeError("out of KV cache blocks (the scheduler should have preempted)")
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != NO_HASH:  # evict its cached prefix
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids, block.parent_hash = NO_HASH, (), NO_HASH
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            if block.hash == NO_HASH:  # nothing worth keeping: reuse it first
                self.free_block_ids.move_to_end(block_id, last=False)

    def check_integrity(self, seqs: list[Sequence]) -> None:
        """Assert the accounting invariants (for tests): ref counts equal the number of
        sequences holding each block, the free list is exactly the unreferenced blocks,
        and the hash table points at blocks carrying that hash."""
        holders = [0] * self.num_blocks
        for seq in seqs:
            for block_id in seq.block_table:
                holders[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == holders[block.block_id], (block, holders[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids), block
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h
