"""Qwen3-MoE (and Qwen2-MoE): the Qwen3 decoder with a routed mixture of experts as MLP.

Attention, norms, embedding and head are Qwen3's; a layer is sparse unless listed in
`mlp_only_layers` or skipped by `decoder_sparse_step` (then it keeps a dense MLP).
Qwen2-MoE adds a shared expert that every token passes through, scaled by a sigmoid gate.
Checkpoint experts (`mlp.experts.{e}.{gate,up,down}_proj.weight`) load into the stacked
`mlp.experts.gate_up_proj` / `mlp.experts.down_proj` tensors of `FusedMoE`.
"""
import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.layers.fused_moe import FusedMoE
from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.models.qwen3 import Qwen3ForCausalLM, Qwen3MLP
from nanovllm.utils.parallel import all_reduce

# an expert's checkpoint projection -> (our stacked parameter, its shard within the expert)
EXPERT_PROJECTIONS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                      "down_proj": ("down_proj", None)}


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                                cfg.moe_intermediate_size, cfg.norm_topk_prob)

    def forward(self, x: torch.Tensor, slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        # NOTE: every rank routes identically (replicated router), so one all-reduce sums the slices
        return all_reduce(self.experts(x, self.gate(x), slot_mapping))


class Qwen2MoeSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.shared_expert = Qwen3MLP(cfg, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x, slot_mapping) + shared


def route_expert_key(key: str) -> tuple[str, tuple[int, int] | int] | None:
    """`...mlp.experts.{e}.{proj}.weight` -> (`...mlp.experts.{stacked}`, shard id); None
    for any other key (the loader's packed mapping handles those)."""
    parts = key.split(".")
    for i in range(len(parts) - 3):
        if parts[i] == "experts" and parts[i + 1].isdigit() and parts[i + 2] in EXPERT_PROJECTIONS:
            if parts[i + 3:] != ["weight"]:
                return None
            target, j = EXPERT_PROJECTIONS[parts[i + 2]]
            expert = int(parts[i + 1])
            return ".".join(parts[:i + 1] + [target]), expert if j is None else (expert, j)
    return None


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    sparse_block = Qwen3MoeSparseMoeBlock

    @classmethod
    def make_mlp(cls, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return cls.sparse_block(cfg) if cfg.is_sparse_layer(layer_id) else Qwen3MLP(cfg)

    route_checkpoint_key = staticmethod(route_expert_key)  # the loader asks before its packed mapping


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    sparse_block = Qwen2MoeSparseMoeBlock
