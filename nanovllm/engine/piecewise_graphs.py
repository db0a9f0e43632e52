"""Piecewise CUDA graphs for steps that carry prefill chunks (mixed and prefill steps).

A decode step replays one whole-model graph (`cuda_graph.py`), but a step with prefill
chunks has an attention shape that depends on its sequences (how many, how long), which
a graph cannot bake in. Everything else in the model (embedding, norms, projections,
RoPE, MLP, all-reduces) depends only on the number of tokens. So for each token-count
bucket we capture the model in pieces, one per stretch between two attention calls:

    piece 0:  embed -> layer 0 pre-attention, K/V store, decode attention     -> q, residual
    piece i:  layer i-1 post-attention -> layer i pre-attention, K/V store,
              decode attention                                                -> q, residual
    piece L:  layer L-1 post-attention -> final norm                          -> hidden

and a step replays the pieces of the smallest bucket >= its token count, running each
layer's prefill-chunk attention eagerly in between on the real (unpadded) rows with the
step's metadata. A step then launches L + 1 graphs and 1-2 attention kernels per layer
instead of every kernel of every layer from Python (vLLM V1 and SGLang run mixed steps
the same way).

The decode rows (a mixed step puts them first) need no eager launch: their kernel's grid
depends only on how many rows it covers, so each piece runs it over the bucket's first
min(bucket, decode graphs' rows) rows with the static decode metadata the decode graphs
use (`DecodeRows`); rows past the step's decodes have context length 0 and get zeros,
which the prefill attention then overwrites. The Python of 28 eager decode launches had
been most of a mixed step's host time: on one H100 host (the chat workload) moving them
into the pieces took the launch from 4.3 to 1.6 ms a step. NOTE: the split count is then
the bucket's (`choose_num_splits` of its rows), not the step's decode count: a step with a
few long decodes beside a prefill chunk may read them in fewer splits than eagerly.

Pieces read and write static buffers sized for the largest bucket, allocated before any
capture, so every piece's own temporaries can share one memory pool with the decode
graphs. NOTE: rows past the step's tokens hold stale but finite values (earlier steps'
rows, valid token ids and positions); each row is computed independently of the others
outside attention, attention sees only the real rows, and the padding rows' slot is -1,
so the K/V store inside the graph writes nothing for them.
"""
import torch
from torch import nn

from nanovllm.engine.cuda_graph import DecodeRows
from nanovllm.engine.input_batch import StepInputs

MAX_TOKENS = 4096  # past this a step's kernels are long enough that launching them from Python is free


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture: every 32 up to 512, 64 up to 1024, 128 up to 2048, 256 beyond
    (padding a step to its bucket wastes at most ~12 % of its token rows)."""
    sizes, size = [], 0
    while size < max_tokens:
        size += 32 if size < 512 else 64 if size < 1024 else 128 if size < 2048 else 256
        sizes.append(min(size, max_tokens))
    return sizes


def _into(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Make `buffer` hold `value` (already does when a fused kernel wrote it in place)."""
    if value.data_ptr() != buffer.data_ptr():
        buffer.copy_(value)


class PiecewiseGraphs:
    """Pieces of a Qwen3-style model (`model.model.{embed_tokens, layers, norm}`, layers with
    `pre_attention` / `post_attention`). Until `capture()` the pieces run eagerly, with the
    same buffers and padding: the CPU tests check the decomposition that way. `decode_rows`
    holds the decode rows' metadata (the decode graphs' own, or one of the same size)."""

    def __init__(self, model: nn.Module, max_tokens: int, dtype: torch.dtype, device: torch.device,
                 decode_rows: DecodeRows):
        self.embed, self.layers, self.norm = model.model.embed_tokens, model.model.layers, model.model.norm
        attn = self.layers[0].self_attn.attn
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        hidden_size = self.embed.weight.shape[1]
        self.sizes = token_buckets(max_tokens)
        self.decode_rows = decode_rows
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.q = torch.zeros(n, heads, head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(n, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n, kv_heads, head_dim, dtype=dtype, device=device)
        self.attn_out = torch.zeros(n, heads, head_dim, dtype=dtype, device=device)
        self.residual = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def _piece(self, i: int, n: int) -> None:
        """Piece i of an n-token step (see the module docstring)."""
        if i == 0:
            hidden, residual = self.embed(self.input_ids[:n]), None
        else:
            hidden, residual = self.layers[i - 1].post_attention(self.attn_out[:n], self.residual[:n],
                                                                  self.slot_mapping[:n])
        if i == len(self.layers):
            hidden, _ = self.norm(hidden, residual)
            _into(self.hidden[:n], hidden)
            return
        layer = self.layers[i]
        q, k, v, residual = layer.pre_attention(self.positions[:n], hidden, residual, self.slot_mapping[:n])
        for buffer, value in ((self.q, q), (self.k, k), (self.v, v), (self.residual, residual)):
            _into(buffer[:n], value)
        rows = self._decode_rows(n)
        layer.self_attn.attn.attend(self.q[:rows], self.k[:rows], self.v[:rows], self.decode_rows.meta(rows),
                                    out=self.attn_out[:rows])

    def _decode_rows(self, n: int) -> int:
        """Rows the decode attention of an n-token bucket covers: a step's decodes are among them."""
        return min(n, self.decode_rows.max_rows)

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket's pieces, largest first, into `pool` (shared with the
        decode graphs: all outputs live in the static buffers). Returns the pool."""
        for n in reversed(self.sizes):
            pieces = []
            for i in range(len(self.layers) + 1):
                self._piece(i, n)  # warmup: compiles kernels, picks GEMM algorithms
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._piece(i, n)
                pool = graph.pool() if pool is None else pool
                pieces.append(graph)
            self.graphs[n] = pieces
        torch.cuda.synchronize()
        return pool

    def can_run(self, inputs: StepInputs) -> bool:
        return inputs.input_ids.shape[0] <= self.sizes[-1]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The step's hidden states [num_tokens, hidden]."""
        num_tokens = inputs.input_ids.shape[0]
        n = next(s for s in self.sizes if s >= num_tokens)
        self.input_ids[:num_tokens] = inputs.input_ids
        self.positions[:num_tokens] = inputs.positions
        self.slot_mapping[:num_tokens] = inputs.meta.slot_mapping
        self.slot_mapping[num_tokens:n] = -1  # NOTE: padding rows store nothing
        # the pieces attend for a mixed step's decodes, eagerly for the rest: its prefill chunks,
        # or every row of another step (or of one with more decodes than the static rows hold),
        # whose rows in the pieces are padding (zeros)
        meta, split = inputs.meta, inputs.meta.split
        decodes = split[0] if split and self.decode_rows.fits(split[0]) else None
        self.decode_rows.fill(decodes, self._decode_rows(n))
        rows, meta = (slice(meta.num_decodes, num_tokens), split[1]) if decodes is not None \
            else (slice(num_tokens), meta)
        pieces = self.graphs.get(n)
        for i in range(len(self.layers) + 1):
            if pieces is None:
                self._piece(i, n)
            else:
                pieces[i].replay()
            if i < len(self.layers):
                attn = self.layers[i].self_attn.attn
                attn.attend(self.q[rows], self.k[rows], self.v[rows], meta, out=self.attn_out[rows])
        return self.hidden[:num_tokens]

    def release(self) -> None:
        self.graphs.clear()
