"""Attention metadata: everything the attention layers need to know about one step's batch.

The runner builds one `AttentionMetadata` per step and passes it down
`model -> decoder layer -> attention` explicitly. Every step, decode or prefill or
mixed, is described the same way: sequence i contributes `q_len_i` new tokens
(its query rows, contiguous in the flattened batch) and attends to `k_len_i`
keys, the last `q_len_i` of which are its own new tokens. Decode is `q_len_i == 1`.
"""
from dataclasses import dataclass, replace
from functools import cached_property

import torch


# Rows of the decode kernel's query tile: (sequence, query head) pairs of one KV head.
DECODE_TILE_ROWS = 16


def decode_unit_size(num_heads: int, num_kv_heads: int) -> int:
    """Most decode rows in one unit: as many as fill the decode kernel's query tile with
    their query heads of one KV head (8 for Qwen3-0.6B's 2 query heads per KV head)."""
    return max(1, DECODE_TILE_ROWS // (num_heads // num_kv_heads))


@dataclass(frozen=True)
class AttentionMetadata:
    # [num_tokens] int64: flat cache slot (block_id * block_size + offset) for each
    # new token's K/V. NOTE: slot -1 is never written (CUDA-graph padding rows).
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32: prefix sums of the query lengths (this step's new tokens).
    cu_seqlens_q: torch.Tensor
    # [num_seqs + 1] int32: prefix sums of the key lengths (cached + new tokens).
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    # [num_seqs] int32: key length of each sequence after this step's tokens are stored.
    # 0 for CUDA-graph padding rows.
    context_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32: the physical block ids of each sequence,
    # padded with -1 past the end of the sequence.
    block_tables: torch.Tensor
    # [num_sampled] int64: rows of the flattened batch whose logits go to the LM head
    # (the last new token of each sequence that samples this step).
    logits_indices: torch.Tensor
    # True when every sequence has exactly one new token (a pure decode step).
    is_decode: bool
    # True when some sequence attends to keys computed in an earlier step (prefix-cache
    # hits, later prefill chunks, decodes). False lets prefill attend to k/v directly.
    has_cached_kv: bool
    # Mixed steps (decodes and prefill chunks together): the scheduler puts the one-token
    # decodes first; the first `num_decodes` sequences attend through the decode kernel and
    # the rest through the prefill kernel (see `split`). 0 when the step is not mixed.
    num_decodes: int = 0
    # [num_prefills + 1] int32: cu_seqlens_q / cu_seqlens_k of the sequences after the
    # decodes, from 0. Set only with num_decodes > 0.
    prefill_cu_seqlens_q: torch.Tensor | None = None
    prefill_cu_seqlens_k: torch.Tensor | None = None
    prefill_max_seqlen_q: int = 0
    prefill_has_cached_kv: bool = False
    # Decode units: [num_decodes, or num_seqs in a decode step, unit size] int32. Each row
    # lists up to unit-size decode rows that share their first decode_shared_lens[u] keys
    # (whole blocks: n > 1 samples of one prompt, prompts with a common cached prefix); the
    # decode kernel reads those keys once for the whole unit. Units are listed longest work
    # first, so the short ones, not a long one started last, end the step; -1 pads a unit,
    # and the rows past the last unit. None: every row alone, in batch order.
    decode_units: torch.Tensor | None = None
    decode_shared_lens: torch.Tensor | None = None   # [same rows] int32: keys a unit shares

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @cached_property
    def split(self) -> tuple["AttentionMetadata", "AttentionMetadata"] | None:
        """A mixed step as (its decodes, its prefill chunks), each a plain step of views into
        this one (no device work), so each part runs through its own kernel; None otherwise.

        NOTE: decode rows read KV through the decode kernel (split-K, query heads of a KV
        head together); through the varlen prefill kernels they cost up to 2x the KV reads."""
        d = self.num_decodes
        if d == 0:
            return None
        decode = replace(self, slot_mapping=self.slot_mapping[:d], cu_seqlens_q=self.cu_seqlens_q[:d + 1],
                         cu_seqlens_k=self.cu_seqlens_k[:d + 1], max_seqlen_q=1, context_lens=self.context_lens[:d],
                         block_tables=self.block_tables[:d], is_decode=True, has_cached_kv=True, num_decodes=0,
                         prefill_cu_seqlens_q=None, prefill_cu_seqlens_k=None)
        prefill = replace(self, slot_mapping=self.slot_mapping[d:], cu_seqlens_q=self.prefill_cu_seqlens_q,
                          cu_seqlens_k=self.prefill_cu_seqlens_k, max_seqlen_q=self.prefill_max_seqlen_q,
                          context_lens=self.context_lens[d:], block_tables=self.block_tables[d:], is_decode=False,
                          has_cached_kv=self.prefill_has_cached_kv, num_decodes=0,
                          prefill_cu_seqlens_q=None, prefill_cu_seqlens_k=None, decode_units=None,
                          decode_shared_lens=None)
        return decode, prefill
