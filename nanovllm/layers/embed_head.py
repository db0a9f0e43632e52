"""Vocabulary-parallel token embedding and LM head."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.loader import check_shape, default_weight_loader
from nanovllm.utils.parallel import all_reduce, divide, gather_to_rank0, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary's rows; ids outside it look
    up zeros, and an all-reduce assembles the full embedding."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = divide(vocab_size, tp_size(), "vocab_size")
        self.vocab_start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape(loaded, (self.vocab_size, param.shape[1]))
        default_weight_loader(param, loaded.narrow(0, self.vocab_start, self.shard_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_shard.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the rows the sampler needs only (`logits_indices`: each sampling
    sequence's last token), gathered on rank 0 (None on other ranks)."""

    def forward(self, hidden: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor | None:
        hidden = hidden[logits_indices]  # [num_sampled, hidden_size]
        return gather_to_rank0(F.linear(hidden, self.weight))
