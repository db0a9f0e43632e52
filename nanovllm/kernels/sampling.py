"""One-pass sampling for the common batch: temperature (or greedy) rows, nothing else.

The sampler's general path costs ~8 launches and ~6 float32 passes over [rows, vocab]
logits per step. When no row asks for top-k/top-p/min-p, penalties, a min_tokens ban, a
seed or logprobs, this kernel reads each row's logits once and returns its token: the
argmax for temperature 0, else the Gumbel-max draw argmax(logit / t + g), g = -log(-log u),
which is the same distribution as the general path's exponential race argmax(p / E).
The uniforms come from Philox keyed by (step seed, row * vocab + token), so a step's draw
is a function of the step seed alone.
"""
import torch
import triton
import triton.language as tl

BLOCK = 2048  # tokens per iteration: 152k-token rows take ~75 iterations


@triton.jit
def _sample_kernel(logits_ptr, temperatures_ptr, out_ptr, seed, vocab, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temperatures_ptr + row)
    greedy = t == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    best_score = -float("inf")
    best_index = 0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + offs)
        gumbel = -tl.log(-tl.log(u))  # u == 0 gives -inf: that token is never drawn
        score = tl.where(greedy, x, x * inv_t + gumbel)
        score = tl.where(mask, score, -float("inf"))
        chunk_best = tl.max(score, axis=0)
        chunk_index = tl.argmax(score, axis=0)  # NOTE: the first of equal maxima, as torch.argmax
        better = chunk_best > best_score          # strict: an earlier chunk keeps a tie
        best_index = tl.where(better, start + chunk_index, best_index)
        best_score = tl.where(better, chunk_best, best_score)
    tl.store(out_ptr + row, best_index.to(tl.int64))


def sample_temperature(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """logits [rows, vocab] (any float dtype, rows contiguous), temperatures [rows] float32
    (0 = greedy), seed in [0, 2**31) -> token ids [rows] int64."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](logits, temperatures, out, seed, vocab, logits.stride(0), BLOCK=BLOCK, num_warps=8)
    return out
