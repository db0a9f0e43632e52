"""Qwen3 (and its close relatives Qwen2 and Llama) from our tensor-parallel layers.

The three differ only in flags that `ModelConfig` normalizes: Qwen3 has a per-head
RMSNorm on q and k; Qwen2 has biased q/k/v projections; Llama may scale RoPE (llama3)
and bias its projections (attention_bias, mlp_bias).
Module names match the HF checkpoint keys, so the loader maps weights by name.
"""
from collections.abc import Callable

import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.kernels import fused_kernels_enabled
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import AttentionMetadata


class Qwen3Attention(nn.Module):
    """The projections around attention; the decoder layer calls `project`, `attn` and `o_proj`
    in turn (the piecewise CUDA graphs cut between them)."""

    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=cfg.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=cfg.o_proj_bias)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, scale=cfg.head_dim ** -0.5)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def project(self, positions: torch.Tensor, hidden: torch.Tensor, slot_mapping: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """hidden [num_tokens, hidden_size] -> q [num_tokens, num_heads, head_dim], k and v
        [num_tokens, num_kv_heads, head_dim]: normed (Qwen3) and rotated, ready for attention,
        k and v also stored in the KV cache at `slot_mapping`."""
        qkv = self.qkv_proj(hidden)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self._norm_rotate_store(positions, q, k, v, slot_mapping)
        return q, k, v

    def _norm_rotate_store(self, positions, q, k, v, slot_mapping):
        """Per-head q/k RMSNorm (Qwen3), RoPE, then the K/V store; on CUDA one fused kernel
        for all three (the store stays apart for an fp8 cache, which it quantizes)."""
        if fused_kernels_enabled(q):
            from nanovllm.kernels.rotary import qk_norm_rope
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
            cache = self.attn.half_precision_cache()
            store = (v, *cache, slot_mapping) if cache else None
            q, k = qk_norm_rope(q, k, positions, self.rotary_emb.cos, self.rotary_emb.sin, *norms, store=store)
        else:
            store = None
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
        if store is None:
            self.attn.store(k, v, slot_mapping)
        return q, k


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size] * 2, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        """slot_mapping: unused (a dense MLP computes every row; see Qwen3MoeSparseMoeBlock)."""
        # the SwiGLU gate, silu(gate) * up, is applied by the down projection as it reads its input
        return self.down_proj(self.gate_up_proj(x), gated=True)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, mlp: nn.Module):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, max_position)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta: AttentionMetadata):
        q, k, v, residual = self.pre_attention(positions, hidden, residual, meta.slot_mapping)
        return self.post_attention(self.self_attn.attn.attend(q, k, v, meta), residual, meta.slot_mapping)

    # The two halves around attention: the piecewise CUDA graphs of mixed steps capture
    # them and run attention, which depends on the step's sequences, eagerly in between.
    def pre_attention(self, positions, hidden, residual, slot_mapping):
        """-> q, k, v (see Qwen3Attention.project; K/V stored in the cache) and the residual stream."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return *self.self_attn.project(positions, hidden, slot_mapping), residual

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor, slot_mapping: torch.Tensor):
        """attn_out [num_tokens, num_heads, head_dim] -> (MLP output, residual stream); slot -1
        marks a CUDA-graph padding row, which a mixture of experts routes nowhere."""
        hidden = self.self_attn.o_proj(attn_out.flatten(1))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, slot_mapping), residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, make_mlp: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg, max_position, make_mlp(cfg, i))
                                     for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    # checkpoint module name -> (our fused module, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__()
        self.model = Qwen3Model(cfg, max_position, self.make_mlp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.tie_word_embeddings = cfg.tie_word_embeddings
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer_id: int) -> nn.Module:
        """Decoder layer `layer_id`'s MLP (the MoE models route some layers to experts)."""
        return Qwen3MLP(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden, logits_indices)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
