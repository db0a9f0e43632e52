"""CUDA graphs for decode steps: one graph per batch size, sharing one memory pool.

A graph replays fixed kernels on fixed addresses, so each step copies its inputs into
static buffers and replays the smallest captured batch size >= its batch. Python values
(batch size, max lengths) are baked in at capture; only tensor contents change.
NOTE: padding rows have slot -1 (nothing stored) and context length 0 (nothing read).
"""
import torch
from torch import nn

from nanovllm.engine.input_batch import StepInputs
from nanovllm.utils.context import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to min(max_num_seqs, 512)."""
    limit = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4, 8) if s <= limit] + list(range(16, limit + 1, 16))
    return sizes if sizes[-1] == limit else sizes + [limit]


class DecodeRows:
    """Static attention metadata for up to `max_rows` decode rows (one query each), shared by
    the decode graphs and the pieces of mixed steps: `fill` copies a step's decode metadata in
    and makes the rows after it padding (context length 0: nothing read, zeros written)."""

    def __init__(self, max_rows: int, max_model_len: int, block_size: int, unit_size: int,
                 device: torch.device):
        self.max_rows, self.max_model_len = max_rows, max_model_len
        # wide enough for max_model_len, plus one spare column
        self.max_blocks = (max_model_len + block_size - 1) // block_size + 1
        n = max_rows
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        # every row alone in its unit: what padding rows get (each writes its zeros)
        self.lone_units = torch.full((n, unit_size), -1, dtype=torch.int32, device=device)
        self.lone_units[:, 0] = torch.arange(n, dtype=torch.int32, device=device)
        self.decode_units = self.lone_units.clone()
        self.decode_shared_lens = torch.zeros(n, dtype=torch.int32, device=device)

    def meta(self, rows: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], cu_seqlens_q=self.cu_seqlens[:rows + 1],
            cu_seqlens_k=self.cu_seqlens[:rows + 1], max_seqlen_q=1, max_seqlen_k=self.max_model_len,
            context_lens=self.context_lens[:rows], block_tables=self.block_tables[:rows],
            logits_indices=self.cu_seqlens[:rows].long(), is_decode=True, has_cached_kv=True,
            decode_units=self.decode_units[:rows], decode_shared_lens=self.decode_shared_lens[:rows])

    def fits(self, meta: AttentionMetadata) -> bool:
        return meta.num_seqs <= self.max_rows and meta.block_tables.shape[1] <= self.max_blocks

    def fill(self, meta: AttentionMetadata | None, rows: int) -> None:
        """Rows [0, meta.num_seqs) from `meta` (a decode step, or a mixed step's decodes), rows
        up to `rows` padding. The slot mapping is left to the caller (decode graphs only)."""
        bs = 0 if meta is None else meta.num_seqs
        if bs:
            self.context_lens[:bs] = meta.context_lens
            self.decode_units[:bs] = meta.decode_units
            self.decode_shared_lens[:bs] = meta.decode_shared_lens
            # NOTE: entries past a sequence's blocks (-1, or stale from an earlier step) are never
            # read: its context length bounds the reads (one copy per step, no clearing)
            self.block_tables[:bs, :meta.block_tables.shape[1]] = meta.block_tables
        if rows > bs:  # the padding rows, alone in the unit slots after the batch's
            self.context_lens[bs:rows] = 0
            self.decode_units[bs:rows] = self.lone_units[bs:rows]
            self.decode_shared_lens[bs:rows] = 0


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, unit_size: int = 1):
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        n = self.max_bs
        self.rows = DecodeRows(n, max_model_len, block_size, unit_size, device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """`pool`: a graph memory pool to share (the piecewise graphs')."""
        self.pool = pool
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            meta = self.rows.meta(bs)
            self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)  # warmup
            with torch.cuda.graph(graph, self.pool):
                self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()

    def can_run(self, inputs: StepInputs) -> bool:
        return inputs.meta.is_decode and self.rows.fits(inputs.meta)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Replay the decode step for `inputs`; returns hidden states [num_seqs, hidden]."""
        bs = inputs.meta.num_seqs
        graph_bs = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs] = inputs.input_ids
        self.positions[:bs] = inputs.positions
        self.rows.slot_mapping[:bs] = inputs.meta.slot_mapping
        if graph_bs > bs:
            self.rows.slot_mapping[bs:graph_bs] = -1
        self.rows.fill(inputs.meta, graph_bs)
        self.graphs[graph_bs].replay()
        return self.hidden[:bs]

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
