"""Token sampling from a batch of logits with per-row temperatures."""
import torch
from torch import nn


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """logits [num_seqs, vocab]; temperatures [num_seqs] (0 = greedy). Returns [num_seqs] int64."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        # sample with the exponential race: argmax(p / E), E ~ Exp(1), is a draw from p,
        # with no cumulative sum or sort over the vocabulary
        safe_t = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
        probs = torch.softmax(logits / safe_t.unsqueeze(1), dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        sampled = (probs / noise.clamp_min(1e-20)).argmax(dim=-1)
        return torch.where(temperatures > 0, sampled, greedy)
