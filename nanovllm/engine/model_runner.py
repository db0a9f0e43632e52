"""One tensor-parallel rank's model: weights, KV cache, CUDA graphs and the forward step."""
import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.config import Config, ModelConfig
from nanovllm.engine.cuda_graph import DecodeGraphs
from nanovllm.engine.input_batch import StepInputs
from nanovllm.engine.kv_cache import KVCachePool, block_bytes, check_kv_cache_fits, kv_cache_dtype
from nanovllm.engine.piecewise_graphs import MAX_TOKENS as PIECEWISE_MAX_TOKENS
from nanovllm.engine.piecewise_graphs import PiecewiseGraphs
from nanovllm.engine.sampling_batch import PendingOutput
from nanovllm.layers.backends import make_backend, resolve_backend
from nanovllm.layers.grammar_mask import GrammarMask
from nanovllm.layers.sampler import Sampler
from nanovllm.models import build_model
from nanovllm.utils.context import AttentionMetadata, decode_unit_size
from nanovllm.utils.loader import load_model
from nanovllm.utils.parallel import in_tp_group, tp_size

logger = logging.getLogger("nanovllm")
NCCL_WATCHDOG_MARGIN_S = 60   # NCCL's timeout beyond step_timeout_s (see _init_distributed)


class ModelRunner:
    def __init__(self, config: Config, model_config: ModelConfig, max_model_len: int, device: torch.device,
                 rank: int = 0, store: dist.Store | None = None):
        self.config, self.model_config = config, model_config
        self.max_model_len, self.device, self.rank = max_model_len, device, rank
        self.graphs = self.piecewise_graphs = None
        self.tp_group = self._init_distributed(store)   # None at one rank: no collectives at all
        try:
            self._build()
        except BaseException:
            self.exit(abort=True)  # NOTE: leave the process as we found it: no process group behind
            raise

    @in_tp_group
    def _build(self) -> None:
        config, model_config, device, max_model_len = self.config, self.model_config, self.device, self.max_model_len
        self.block_size = config.kvcache_block_size
        # decode rows a unit may hold: the step inputs' and the decode graphs' unit tables agree
        self.decode_unit_size = decode_unit_size(model_config.num_attention_heads, model_config.num_key_value_heads)
        self.dtype = model_config.resolve_dtype(config.dtype, device)
        self.backend_name = resolve_backend(config.attention_backend, device, self.block_size, self.dtype,
                                            config.kv_cache_dtype)
        self.model = self._load_model()
        self.backend = make_backend(self.backend_name, self.block_size, max_model_len)
        for layer in self.model.attention_layers():  # warmup runs before the cache exists
            layer.backend = self.backend
        peak = self._warmup()
        self.num_kvcache_blocks = self._num_kvcache_blocks(peak)
        self._allocate_kv_cache()
        self._compile_prefill_kernels()
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.prev_sampled = None   # the last step's sampled ids, on the device (overlap scheduling)
        self._launched = None      # (inputs, logits) of the step between `launch` and `sample`
        self.graphs, self.piecewise_graphs = self._capture_graphs()

    # ---- construction ----------------------------------------------------------------
    def _init_distributed(self, store: dist.Store | None) -> dist.ProcessGroup | None:
        world_size = self.config.tensor_parallel_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if world_size == 1:
            return None
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel LLM already runs in this process; call its exit() first")
        # NOTE: a gloo collective waiting longer than step_timeout_s (a stuck peer) raises instead of
        # hanging; NCCL's own watchdog tears the process down, so rank 0's polling one must fire first
        margin = NCCL_WATCHDOG_MARGIN_S if self.device.type == "cuda" else 0
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=store,
                                world_size=world_size, rank=self.rank,
                                timeout=timedelta(seconds=self.config.step_timeout_s + margin),
                                device_id=self.device if self.device.type == "cuda" else None)
        return dist.group.WORLD

    def _load_model(self) -> torch.nn.Module:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # build straight in the target dtype, on the device
        try:
            with torch.device(self.device):
                model = build_model(self.model_config, self.max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(model, self.config.model, self.config.load_format)
        return model.eval()

    @torch.inference_mode()
    def _warmup(self) -> int:
        """A forward pass at the largest prefill the budget allows; returns its peak
        activation bytes (CUDA only; the KV cache must leave room for it)."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup_forward(self._max_prefill_tokens())
        torch.cuda.synchronize()
        peak = torch.cuda.memory_stats(self.device)["allocated_bytes.all.peak"]
        current = torch.cuda.memory_stats(self.device)["allocated_bytes.all.current"]
        torch.cuda.empty_cache()
        return peak - current

    @torch.inference_mode()
    def _compile_prefill_kernels(self) -> None:
        """With the cache bound (its K/V store compiled in): the largest prefill and one token
        short of it. NOTE: Triton builds a kernel per size class of its integer arguments (a
        multiple of 16 or not), so without the second pass an eager prompt step of another size
        compiled mid-run (~1 s of the Qwen3-30B-A3B reference run on a fresh machine)."""
        if self.device.type == "cuda" and self.backend_name != "torch":  # the oracle: speed is not its job
            num_tokens = self._max_prefill_tokens()
            for n in dict.fromkeys((num_tokens, max(1, num_tokens - 1))):
                self._warmup_forward(n)
            torch.cuda.empty_cache()  # NOTE: as after _warmup: the graphs' pools start from the same free memory

    def _max_prefill_tokens(self) -> int:
        return min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)

    def _warmup_forward(self, num_tokens: int) -> None:
        """A prefill of num_tokens in sequences of up to max_model_len; no KV is stored (slot -1)."""
        lengths = [min(self.max_model_len, num_tokens - i) for i in range(0, num_tokens, self.max_model_len)]
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
            # every page is block 0: with the cache bound, a paged prefill kernel reads valid memory
            context_lens=cu.diff(), block_tables=torch.zeros(len(lengths), -(-max(lengths) // self.block_size),
                                                             dtype=torch.int32, device=self.device),
            logits_indices=(cu[1:] - 1).long(), is_decode=False, has_cached_kv=False)
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, positions, meta)
        self.model.compute_logits(hidden, meta.logits_indices)

    def _num_kvcache_blocks(self, activation_peak: int) -> int:
        cfg, m = self.config, self.model_config
        num_kv_heads = max(1, m.num_key_value_heads // tp_size())
        per_block = block_bytes(m.num_hidden_layers, self.block_size, num_kv_heads, m.head_dim,
                                kv_cache_dtype(cfg.kv_cache_dtype, self.dtype))
        if cfg.num_kvcache_blocks != -1:
            check_kv_cache_fits(cfg.num_kvcache_blocks, per_block, self.device)
            return cfg.num_kvcache_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * cfg.gpu_memory_utilization) - (total - free) - activation_peak
        else:
            budget = cfg.cpu_kvcache_bytes
        num_blocks = budget // per_block
        if tp_size() > 1:  # every rank must hold the same blocks: take the smallest budget
            count = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
        if num_blocks < 1:
            hint = ("raise gpu_memory_utilization, or lower kvcache_block_size or max_num_batched_tokens"
                    if self.device.type == "cuda" else "raise cpu_kvcache_bytes or lower kvcache_block_size")
            raise RuntimeError(f"no memory left for the KV cache (one block of {self.block_size} tokens needs "
                               f"{per_block} bytes, {max(budget, 0)} available): {hint}")
        check_kv_cache_fits(num_blocks, per_block, self.device)
        return num_blocks

    def _allocate_kv_cache(self) -> None:
        m = self.model_config
        num_kv_heads = self.model.attention_layers()[0].num_kv_heads
        self.kv_pool = KVCachePool(m.num_hidden_layers, self.num_kvcache_blocks, self.block_size, num_kv_heads,
                                   m.head_dim, kv_cache_dtype(self.config.kv_cache_dtype, self.dtype), self.device)
        self.kv_pool.bind(self.model.attention_layers(), self.backend)

    def _capture_graphs(self) -> tuple[DecodeGraphs | None, PiecewiseGraphs | None]:
        """Whole-model graphs for decode steps, piecewise ones for steps with prefill chunks."""
        if self.config.enforce_eager or self.device.type != "cuda":
            return None, None
        graphs = DecodeGraphs(self.model, self.config.max_num_seqs, self.max_model_len, self.block_size,
                              self.model_config.hidden_size, self.dtype, self.device, self.decode_unit_size)
        pieces = PiecewiseGraphs(self.model, min(self.config.max_num_batched_tokens, PIECEWISE_MAX_TOKENS),
                                 self.dtype, self.device, graphs.rows)
        graphs.capture(pieces.capture())
        return graphs, pieces

    # ---- the step ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits [num_sampled, vocab] on rank 0, None on other ranks."""
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)
        elif self.piecewise_graphs is not None and self.piecewise_graphs.can_run(inputs):
            hidden = self.piecewise_graphs.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.compute_logits(hidden, inputs.meta.logits_indices)

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> PendingOutput:
        """Launch one step on this rank. Returns the sampled tokens (and logprobs) of the
        sequences that sample, on their way to the host (rank 0; empty on other ranks)."""
        self.launch(inputs)
        return self.sample()

    @in_tp_group
    @torch.inference_mode()
    def launch(self, inputs: StepInputs) -> None:
        """The step's forward pass; `sample` finishes the step. Between the two the host may
        prepare what sampling needs (the grammar masks) while the device runs the forward."""
        inputs = inputs.to(self.device)
        if inputs.deferred_index is not None:  # ids sampled by the previous step, never seen by the host
            inputs.input_ids[inputs.deferred_index] = self.prev_sampled[inputs.deferred_prev_row]
        self._launched = inputs, self.forward(inputs)

    @in_tp_group
    @torch.inference_mode()
    def sample(self, grammar: GrammarMask | None = None) -> PendingOutput:
        """Sample the launched step's logits (rank 0); `grammar` masks the constrained rows."""
        (inputs, logits), self._launched = self._launched, None
        if not inputs.sampling_seq_ids:
            return PendingOutput([], None, None)
        out = None
        if logits is not None:
            # NOTE: outside any CUDA graph: the sampler runs eagerly on the logits
            grammar = None if grammar is None else grammar.to(self.device)
            out = self.sampler(logits, inputs.sampling, self.generator, grammar)
            self.prev_sampled = out.token_ids
        if tp_size() > 1 and self.config.enable_overlap:
            # the other ranks read their next inputs from these ids too
            if self.rank != 0:
                self.prev_sampled = torch.empty(len(inputs.sampling_seq_ids), dtype=torch.int64, device=self.device)
            dist.broadcast(self.prev_sampled, src=0)
        return PendingOutput(inputs.sampling_seq_ids, out, inputs.sampling)

    def exit(self, abort: bool = False) -> None:
        """Free CUDA graphs, then the process group. `abort`: a peer died, so pending
        NCCL work can never finish; abort the communicators instead of waiting for it."""
        # NOTE: CUDA graphs hold communicator state: free them before the process group
        for graphs in (self.graphs, self.piecewise_graphs):
            if graphs is not None:
                graphs.release()
        self.graphs = self.piecewise_graphs = None
        if self.tp_group is None or not dist.is_initialized():  # NOTE: never another engine's group
            return
        self.tp_group = None
        if abort and dist.get_backend() == "nccl":
            try:
                from torch.distributed.distributed_c10d import _abort_process_group
                _abort_process_group()  # also destroys the group
                return
            except Exception as e:  # experimental API: never let it hide the original error
                logger.warning("could not abort the NCCL communicators: %s", e)
        dist.destroy_process_group()
