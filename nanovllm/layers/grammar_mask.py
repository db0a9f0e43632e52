"""Grammar-constrained sampling: a token bitmask per constrained row, applied to its logits
before sampling (the engine fills it from each sequence's grammar matcher)."""
from dataclasses import dataclass

import torch

BITS_PER_WORD = 32


@dataclass(frozen=True)
class GrammarMask:
    """Which tokens each constrained row may sample: bit j of word w (two's complement)
    allows token 32 * w + j. It spans the logits' width (the model's vocab_size)."""
    bitmask: torch.Tensor               # [num_masked_rows, ceil(vocab / 32)] int32
    rows: torch.Tensor | None = None    # [num_masked_rows] int64: the logits rows masked; None: every row

    def to(self, device: torch.device) -> "GrammarMask":
        if device.type == "cpu":
            return self
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
        return GrammarMask(move(self.bitmask), move(self.rows))

    def row_index(self, num_rows: int) -> torch.Tensor:
        """[num_rows] int32: each logits row's bitmask row, -1 where the row is not masked."""
        device = self.bitmask.device
        if self.rows is None:
            return torch.arange(num_rows, dtype=torch.int32, device=device)
        index = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
        index[self.rows] = torch.arange(len(self.rows), dtype=torch.int32, device=device)
        return index


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool, True = allowed."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                         # [rows, words, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> None:
    """In place: logits[row, token] = -inf for every token the row's bitmask disallows."""
    rows = logits if mask.rows is None else logits[mask.rows]            # [num_masked_rows, vocab]
    if logits.is_cuda:
        from xgrammar import apply_token_bitmask_inplace  # the engine checked that it is installed
        apply_token_bitmask_inplace(rows, mask.bitmask, vocab_size=logits.shape[1])  # one fused kernel
    else:
        rows.masked_fill_(~unpack_bitmask(mask.bitmask, logits.shape[1]), float("-inf"))
    if mask.rows is not None:
        logits[mask.rows] = rows
