"""The one-pass temperature sampling kernel: greedy rows are torch's argmax, and the
draws follow softmax(logits / t) (checked by frequency on a small vocabulary, through the
Triton interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton")
from nanovllm.kernels.sampling import sample_temperature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_greedy_rows_are_argmax_with_first_index_on_ties():
    logits = torch.randn(6, 5000, device=DEVICE)
    logits[1, 10] = logits[1, 4000] = logits[1].max() + 1  # a tie across chunks: the first wins
    ids = sample_temperature(logits, torch.zeros(6, device=DEVICE), seed=3)
    assert ids.tolist() == logits.argmax(dim=-1).tolist() and ids[1].item() == 10


def test_draws_follow_the_tempered_softmax():
    rows, vocab = (20000 if DEVICE == "cuda" else 400), 6  # the interpreter runs each row's program in turn
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")], device=DEVICE)
    temperatures = torch.tensor([0.5, 1.0], device=DEVICE).repeat_interleave(rows // 2)
    ids = sample_temperature(base.expand(rows, vocab).contiguous(), temperatures, seed=11)
    for half, t in enumerate((0.5, 1.0)):
        drawn = ids[half * rows // 2:(half + 1) * rows // 2]
        freq = torch.bincount(drawn, minlength=vocab).float() / drawn.numel()
        expected = torch.softmax(base / t, dim=0)
        assert freq[-1] == 0  # a -inf logit is never drawn
        tolerance = 4.5 * (0.25 / drawn.numel()) ** 0.5  # 4.5 binomial standard deviations at most
        assert (freq - expected).abs().max().item() < tolerance, (t, freq.tolist(), expected.tolist())
    # another seed draws other tokens; the same seed the same ones
    few = base.expand(64, vocab).contiguous()
    again, other = (sample_temperature(few, temperatures[:64], seed=s) for s in (11, 12))
    assert torch.equal(ids[:64], again) and not torch.equal(again, other)
