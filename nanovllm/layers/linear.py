"""Linear layers, Megatron-style tensor parallel.

Column-parallel layers split their output features over the ranks, row-parallel ones
their input features (then all-reduce). Each parameter has a `weight_loader(param,
loaded_weight[, shard_id])` that copies this rank's shard of a checkpoint tensor; at one
rank the shard is the whole tensor. Fused layers (QKV, gate/up) list their `shard_ids`
so the loader can check that every shard was loaded exactly once.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import fused_kernels_enabled
from nanovllm.layers.activation import silu_and_mul
from nanovllm.utils.loader import check_shape
from nanovllm.utils.loader import default_weight_loader as _copy
from nanovllm.utils.parallel import all_reduce, divide, tp_rank, tp_size


SKINNY_MAX_ROWS = 1  # the rows up to which kernels/skinny_gemm.py beat cuBLAS on the H200


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gated: bool = False) -> torch.Tensor:
    """x W^T + b. `gated`: x is [gate | up] and the product's input silu(gate) * up (SwiGLU)."""
    if x.shape[0] <= SKINNY_MAX_ROWS and fused_kernels_enabled(x):  # batch-1 decode: bound by reading W
        from nanovllm.kernels.skinny_gemm import skinny_linear
        return skinny_linear(x, weight, bias, gated=gated)  # gated: no silu_and_mul launch of its own
    return F.linear(silu_and_mul(x) if gated else x, weight, bias)


class LinearBase(nn.Module):
    """y = x W^T (+ b), with W of shape [output_size, input_size] on this rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _copy(param, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; each rank keeps its slice of the output."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, tp_size(), "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        check_shape(loaded, (size * tp_size(), *param.shape[1:]))
        _copy(param, loaded.narrow(0, tp_rank() * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)
        self.weight.shard_ids = list(range(len(output_sizes)))
        if bias:
            self.bias.shard_ids = list(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        tp = tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        check_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, tp_rank() * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split over ranks. With fewer KV heads than
    ranks, each KV head is replicated on tp_size // total_num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        if total_num_kv_heads >= tp:
            self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
        else:
            divide(tp, total_num_kv_heads, "a replicated KV head count")
            self.num_kv_heads = 1
        self.kv_replicas = max(1, tp // total_num_kv_heads)
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, output_size, bias)
        self.weight.shard_ids = ["q", "k", "v"]
        if bias:
            self.bias.shard_ids = ["q", "k", "v"]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, tp_rank() * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (tp_rank() // self.kv_replicas) * kv_size
        total_heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        check_shape(loaded, (total_heads * self.head_dim, *param.shape[1:]))
        _copy(param.data.narrow(0, offset, size), loaded.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs are summed by an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, tp_size(), "input features"), output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            _copy(param, loaded)
            return
        size = param.shape[1]
        check_shape(loaded, (param.shape[0], size * tp_size()))
        _copy(param, loaded.narrow(1, tp_rank() * size, size))

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """`gated`: x is [gate | up], the layer's input silu(gate) * up (see `linear`)."""
        y = all_reduce(linear(x, self.weight, gated=gated))
        return y + self.bias if self.bias is not None else y
