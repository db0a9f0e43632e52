"""The sampling kernels against exact argmax and the softmax they must draw from. On CPU they
run in Triton's interpreter (small vocabularies, small chunks so rows cross chunk borders);
the `cuda` case runs the engine's sizes. The Sampler's CUDA runs of tests/unit/test_sampler.py
check its distribution and seeds through these kernels."""
import math

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nanovllm.kernels.sampling import draw_tokens, uniform64  # noqa: E402

SMALL = dict(chunk=32, block=16)  # interpreter-sized: a 100-id row spans 4 chunks


def keys(n: int, start: int = 0, device="cpu") -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64, device=device) * 7919 + 12345


@triton.jit
def _uniform_kernel(keys_ptr, out_ptr):
    i = tl.program_id(0)
    tl.store(out_ptr + i, uniform64(tl.load(keys_ptr + i)))


def test_each_key_draws_one_uniform_below_1():
    """Kolmogorov-Smirnov over 500 keys (p = 0.001); every value in [0, 1), 53 bits apart."""
    n = 500
    out = torch.empty(n, dtype=torch.float64)
    _uniform_kernel[(n,)](keys(n), out)
    assert ((out >= 0) & (out < 1)).all()
    assert torch.equal(out * 2**53, torch.round(out * 2**53))
    u = out.sort().values
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ecdf_hi - u, u - (ecdf_hi - 1 / n)).max().item()
    assert ks < 1.95 / n ** 0.5, ks


def test_greedy_rows_take_the_first_maximum():
    logits = torch.randn(6, 100)
    logits[1, [5, 40, 77]] = 9.0      # ties across chunks: the first wins, as torch.argmax
    logits[2, [33, 34]] = 9.0         # ties inside a chunk
    logits[3, :] = -math.inf
    logits[3, 99] = 0.0               # the last id, in a partial chunk
    out = draw_tokens(logits, torch.zeros(6), keys(6), **SMALL)
    assert out.dtype == torch.int64
    assert out.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's numpy, before the clamp
def test_extreme_logits_and_temperatures_draw_the_only_candidate():
    """No NaN where x / T overflows, nor where one id far below 0 is the row's only candidate."""
    logits = torch.full((4, 100), -math.inf)
    logits[0, [3, 50, 97]] = torch.tensor([0.0, 1.0, 2.0])      # T = 1e-20: all mass on id 97
    logits[1, [10, 70]] = torch.tensor([1e30, 0.0])              # x / T overflows to inf: id 10
    logits[2, 99] = -1e30                                        # the only candidate, in the last chunk
    logits[3, 64] = 0.0                                          # the only candidate, mid-row
    t = torch.tensor([1e-20, 1e-20, 1.0, 0.5])
    out = draw_tokens(logits, t, keys(4), **SMALL)
    assert out.tolist() == [97, 10, 99, 64]


def test_masked_tokens_are_never_drawn_and_keys_reproduce():
    # ~10 of 100 ids allowed, near-uniform draws (T = 5): a kernel that drew masked ids would
    # hit one in a row with probability ~0.9, so 16 rows would all miss with ~1e-16
    rows = 16
    logits = torch.zeros(rows, 100)
    allowed = torch.rand(rows, 100) < 0.1
    allowed[:, 0] = True
    logits[~allowed] = -math.inf
    t = torch.full((rows,), 5.0)
    out = draw_tokens(logits, t, keys(rows), **SMALL)
    assert allowed[torch.arange(rows), out].all()
    # a row's draw depends on its key alone: same keys in another order and batch give the same ids
    perm = torch.randperm(rows)[:10]
    again = draw_tokens(logits[perm], t[perm], keys(rows)[perm], **SMALL)
    assert again.tolist() == out[perm].tolist()


def test_draws_follow_the_tempered_softmax(temperature=0.7):
    """Chi-square test of 600 draws (one per key) over a 12-id row against softmax(x / T).

    600 draws tell a wrong sampler apart: one that ignores T (draws from softmax(x)) fails
    the first test with probability 0.998 (noncentrality 66); one that multiplies by T, or
    doubles the noise, or swaps the two likeliest ids, or never draws the likeliest, or draws
    uniformly, with probability ~1 (noncentralities 190 to 5,200). The last assertion checks
    the first case on these draws: they reject softmax(x)."""
    x = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 0.7, -2.0, 1.2, -math.inf])
    n = 600  # one program per row: the interpreter's cost (800 draws took 18 s of CI's budget)
    out = draw_tokens(x.expand(n, -1).contiguous(), torch.full((n,), temperature), keys(n),
                      chunk=8, block=4)   # two chunks, the first scanned in two loads
    counts = torch.bincount(out, minlength=12).double()
    assert counts[11] == 0

    def chi2(t: float) -> float:
        expected = torch.softmax(x.double() / t, dim=0)[:11] * n
        return (((counts[:11] - expected) ** 2) / expected).sum().item()
    assert chi2(temperature) < 35.0, (chi2(temperature), counts.tolist())  # 10 dof: p ~ 1e-4
    assert chi2(1.0) > 35.0, (chi2(1.0), counts.tolist())  # not the untempered softmax


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_engine_sizes(dtype):
    rows, vocab = 256, 151_936
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    t = torch.full((rows,), 0.6, device="cuda")
    t[::4] = 0.0
    out = draw_tokens(logits, t, keys(rows, device="cuda"))
    greedy = logits.float().argmax(dim=-1)
    assert torch.equal(out[::4], greedy[::4])
    assert_draws_from_softmax(logits[1::4], 0.6, out[1::4])
    assert torch.equal(out, draw_tokens(logits, t, keys(rows, device="cuda")))


def assert_draws_from_softmax(logits: torch.Tensor, temperature: float, ids: torch.Tensor) -> None:
    """One draw per row from softmax(logits / T) over a large vocabulary: the randomized
    probability integral transform (the mass of the more likely tokens, plus a uniform share
    of the drawn token's own) is uniform on (0, 1) exactly when the draws follow the
    distribution; Kolmogorov-Smirnov at p = 0.001."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    p_drawn = probs.gather(1, ids[:, None])                                  # [rows, 1]
    mass_before = (probs * (probs > p_drawn)).sum(dim=-1)
    u = (mass_before + p_drawn.squeeze(1) * torch.rand(len(ids), dtype=torch.float64, device=probs.device))
    u = u.sort().values.cpu()
    n = len(u)
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ecdf_hi - u, u - (ecdf_hi - 1 / n)).max().item()
    assert ks < 1.95 / n ** 0.5, f"KS {ks:.3f} over {n} draws"


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] bool -> the [rows, ceil(vocab / 32)] int32 bitmask xgrammar fills."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, -(-vocab // 32) * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32, device=allowed.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def masked_case(rows: int, vocab: int, device="cpu"):
    """Random logits, a bitmask for every other row (row -> mask row reversed), and the same
    masks written into the logits as -inf: the kernel must draw identically from both."""
    logits = torch.randn(rows, vocab, device=device) * 3
    allowed = torch.rand(rows, vocab, device=device) < 0.3
    allowed[:, vocab - 1] = True                      # the last id, in the last (partial) word
    constrained = torch.arange(0, rows, 2, device=device)
    order = constrained.flip(0)                       # the bitmask's rows need not follow the logits'
    mask_rows = torch.full((rows,), -1, dtype=torch.int32, device=device)
    mask_rows[order] = torch.arange(len(order), dtype=torch.int32, device=device)
    premasked = logits.clone()
    premasked[constrained] = premasked[constrained].masked_fill(~allowed[constrained], -math.inf)
    return logits, pack(allowed[order]), mask_rows, premasked, allowed


def test_the_bitmask_equals_masking_the_logits_first():
    rows, vocab = 8, 100
    logits, bitmask, mask_rows, premasked, allowed = masked_case(rows, vocab)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 2.0, 0.0, 1.0])
    out = draw_tokens(logits, t, keys(rows), bitmask=bitmask, mask_rows=mask_rows, **SMALL)
    assert out.tolist() == draw_tokens(premasked, t, keys(rows), **SMALL).tolist()
    assert allowed[0::2].gather(1, out[0::2, None]).all()
    assert out[1::2].tolist() == draw_tokens(logits[1::2], t[1::2], keys(rows)[1::2], **SMALL).tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bitmask_at_engine_sizes():
    rows, vocab = 256, 151_936
    logits, bitmask, mask_rows, premasked, allowed = masked_case(rows, vocab, device="cuda")
    t = torch.full((rows,), 0.6, device="cuda")
    t[::3] = 0.0
    k = keys(rows, device="cuda")
    out = draw_tokens(logits.bfloat16(), t, k, bitmask=bitmask, mask_rows=mask_rows)
    assert torch.equal(out, draw_tokens(premasked.bfloat16(), t, k))
    assert allowed[0::2].gather(1, out[0::2, None]).all()
