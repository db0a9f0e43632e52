"""Mixture-of-experts layer: a router picks top-k experts per token, each a SwiGLU MLP.

The experts' weights are stacked, as the fused kernels want them: `gate_up_proj`
[num_experts, 2 * intermediate, hidden] ([gate; up] rows) and `down_proj` [num_experts,
hidden, intermediate]. Tensor parallelism splits every expert's intermediate dimension
(gate/up column-parallel, down row-parallel), so each rank returns a partial sum that the
caller all-reduces once per layer. On CUDA the experts run as two grouped Triton GEMMs
(`nanovllm.kernels.fused_moe`); elsewhere as `fused_experts_reference`, the oracle.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import fused_kernels_enabled
from nanovllm.utils.loader import check_shape
from nanovllm.utils.loader import default_weight_loader as _copy
from nanovllm.utils.parallel import divide, tp_rank, tp_size


class Routing(NamedTuple):
    weights: torch.Tensor  # [num_tokens, top_k] float32: each chosen expert's share of the token
    ids: torch.Tensor      # [num_tokens, top_k] int32: the chosen experts, most probable first;
                           # num_experts: no expert (a padding row's, weight 0)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   slot_mapping: torch.Tensor | None = None) -> Routing:
    """Softmax over all experts in float32, then the top k (renormalized to sum to 1 when
    `renormalize`, HF's norm_topk_prob); on CUDA one Triton kernel. Rows whose slot is -1
    (CUDA-graph padding) are routed to no expert, so they add no expert weights to a step's reads."""
    if fused_kernels_enabled(router_logits):
        from nanovllm.kernels.fused_moe import topk_softmax
        return Routing(*topk_softmax(router_logits, top_k, renormalize, slot_mapping))
    return select_experts_reference(router_logits, top_k, renormalize, slot_mapping)


def select_experts_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                             slot_mapping: torch.Tensor | None = None) -> Routing:
    """NOTE: ties go to the lowest expert id (a stable descending sort), so routing never
    depends on the sort kernel: torch.topk leaves the order of equal values unspecified."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [num_tokens, num_experts]
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :top_k], ids[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if slot_mapping is not None:
        padding = (slot_mapping < 0)[:, None]
        weights = weights.masked_fill(padding, 0.0)
        ids = ids.masked_fill(padding, router_logits.shape[-1])
    return Routing(weights, ids.to(torch.int32))


def fused_experts_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                            routing: Routing) -> torch.Tensor:
    """The torch oracle: for each expert that received tokens, its SwiGLU MLP on them,
    scaled by the routing weight and summed per token (in float32, expert by expert)."""
    num_tokens, top_k = routing.ids.shape
    num_experts, intermediate = down.shape[0], down.shape[2]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    flat = routing.ids.flatten().long()                    # [num_tokens * top_k]: pair p is (p // top_k, p % top_k)
    order = torch.argsort(flat, stable=True)               # pair ids grouped by expert
    # bin num_experts: pairs routed to no expert, sorted last and left out by zip
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()  # NOTE: a host sync (oracle only)
    for expert, pairs in zip(range(num_experts), order.split(counts)):
        if len(pairs) == 0:
            continue
        tokens = pairs // top_k
        gate_up_out = F.linear(x[tokens], gate_up[expert])  # [n, 2 * intermediate]
        hidden = F.silu(gate_up_out[:, :intermediate]) * gate_up_out[:, intermediate:]
        y = F.linear(hidden, down[expert]).float() * routing.weights.flatten()[pairs, None]
        out[tokens] += y  # NOTE: a token picks an expert at most once: no repeated rows (index_add_ is slow on CPU)
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """`num_experts` SwiGLU experts, `top_k` per token; returns this rank's partial output."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size = hidden_size
        self.intermediate_size = divide(intermediate_size, tp_size(), "moe_intermediate_size")  # per rank
        size = self.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size), requires_grad=False)
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.gate_up_proj.shard_ids = [(e, j) for e in range(num_experts) for j in (0, 1)]  # j: 0 gate, 1 up
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, size), requires_grad=False)
        self.down_proj.weight_loader = self._load_down
        self.down_proj.shard_ids = list(range(num_experts))

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int]) -> None:
        expert, j = shard_id
        size = self.intermediate_size
        check_shape(loaded, (size * tp_size(), self.hidden_size))
        _copy(param.data[expert].narrow(0, j * size, size), loaded.narrow(0, tp_rank() * size, size))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, expert: int) -> None:
        size = self.intermediate_size
        check_shape(loaded, (self.hidden_size, size * tp_size()))
        _copy(param.data[expert], loaded.narrow(1, tp_rank() * size, size))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor,
                slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        """x: [num_tokens, hidden], router_logits: [num_tokens, num_experts] -> [num_tokens, hidden];
        rows whose slot is -1 (CUDA-graph padding) come out zero."""
        routing = select_experts(router_logits, self.top_k, self.renormalize, slot_mapping)
        if fused_kernels_enabled(x):
            from nanovllm.kernels.fused_moe import fused_experts
            return fused_experts(x, self.gate_up_proj, self.down_proj, routing.weights, routing.ids)
        return fused_experts_reference(x, self.gate_up_proj, self.down_proj, routing)
