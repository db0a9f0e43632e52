"""The one-pass Gumbel-max sampling kernel against exact argmax and the softmax it must
draw from. On CPU it runs in Triton's interpreter (small vocabularies, small chunks so
rows cross chunk borders); the `cuda` case runs the engine's sizes. The Sampler's CUDA
runs of tests/unit/test_sampler.py check its distribution and seeds through this kernel."""
import math

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nanovllm.kernels.sampling import _exponential, gumbel_argmax  # noqa: E402

SMALL = dict(chunk=32, block=16)  # interpreter-sized: a 100-id row spans 4 chunks


def keys(n: int, start: int = 0, device="cpu") -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64, device=device) * 7919 + 12345


@triton.jit
def _noise_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + offs, mask=offs < n, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + offs, _exponential(bits), mask=offs < n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_noise_is_exp1_and_finite_at_both_ends(device):
    """The noise is -log(1 - a), a = (r + 0.5) / 2^32, for uint32 r: the smallest values (which
    decide the race) through the series, the rest through the log. Near a = 1 float32 holds
    a coarsely (the largest noise values, which never decide a race), but where a rounds to 1
    (the top 128 r) the noise must stay finite, so a row's only candidate id still wins."""
    # below a = 1 - 2^-10: there float32's rounding of r moves -log(1 - a) by under 1e-5
    spread = torch.randint(0, 2**32 - 2**22, (500,), generator=torch.Generator().manual_seed(0))
    low = torch.cat([torch.arange(0, 64), torch.arange(2**24 - 64, 2**24 + 64), spread])  # 2^24: a ~ 1/256, the branch
    r = torch.cat([low, torch.arange(2**32 - 256, 2**32)])
    bits = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32).to(device)
    out = torch.empty(len(r), dtype=torch.float32, device=device)
    _noise_kernel[(1,)](bits, out, len(r), BLOCK=triton.next_power_of_2(len(r)))
    out = out.cpu().double()
    exact = -torch.log1p(-(r.double() + 0.5) / 2**32)
    torch.testing.assert_close(out[:len(low)], exact[:len(low)], rtol=2e-5, atol=0)
    top = out[len(low):]
    assert torch.isfinite(top).all() and (top > 15.0).all(), top


def test_greedy_rows_take_the_first_maximum():
    logits = torch.randn(6, 100)
    logits[1, [5, 40, 77]] = 9.0      # ties across chunks: the first wins, as torch.argmax
    logits[2, [33, 34]] = 9.0         # ties inside a chunk
    logits[3, :] = -math.inf
    logits[3, 99] = 0.0               # the last id, in a partial chunk
    out = gumbel_argmax(logits, torch.zeros(6), keys(6), **SMALL)
    assert out.dtype == torch.int64
    assert out.tolist() == logits.argmax(dim=-1).tolist()


def test_masked_tokens_are_never_drawn_and_keys_reproduce():
    # ~10 of 100 ids allowed, near-uniform draws (T = 5): a kernel that drew masked ids would
    # hit one in a row with probability ~0.9, so 16 rows would all miss with ~1e-16
    rows = 16
    logits = torch.zeros(rows, 100)
    allowed = torch.rand(rows, 100) < 0.1
    allowed[:, 0] = True
    logits[~allowed] = -math.inf
    t = torch.full((rows,), 5.0)
    out = gumbel_argmax(logits, t, keys(rows), **SMALL)
    assert allowed[torch.arange(rows), out].all()
    # a row's draw depends on its key alone: same keys in another order and batch give the same ids
    perm = torch.randperm(rows)[:10]
    again = gumbel_argmax(logits[perm], t[perm], keys(rows)[perm], **SMALL)
    assert again.tolist() == out[perm].tolist()


def test_draws_follow_the_tempered_softmax(temperature=0.7):
    """Chi-square test of 800 draws (one per key) over a 12-id row against softmax(x / T).

    800 draws tell a wrong sampler apart: one that ignores T (draws from softmax(x)) fails
    the first test with probability 0.9996 (noncentrality 88); one that multiplies by T, or
    doubles the noise, or swaps two ids, or never draws one, or draws uniformly, with
    probability ~1 (noncentralities 250 to 7,000). The last assertion checks the first case
    on these draws: they reject softmax(x)."""
    x = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 0.7, -2.0, 1.2, -math.inf])
    n = 800  # one program per row: the interpreter's cost
    out = gumbel_argmax(x.expand(n, -1).contiguous(), torch.full((n,), temperature), keys(n),
                        chunk=16, block=16)
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
    out = gumbel_argmax(logits, t, keys(rows, device="cuda"))
    greedy = logits.float().argmax(dim=-1)
    assert torch.equal(out[::4], greedy[::4])
    assert_draws_from_softmax(logits[1::4], 0.6, out[1::4])
    assert torch.equal(out, gumbel_argmax(logits, t, keys(rows, device="cuda")))


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
    out = gumbel_argmax(logits, t, keys(rows), bitmask=bitmask, mask_rows=mask_rows, **SMALL)
    assert out.tolist() == gumbel_argmax(premasked, t, keys(rows), **SMALL).tolist()
    assert allowed[0::2].gather(1, out[0::2, None]).all()
    assert out[1::2].tolist() == gumbel_argmax(logits[1::2], t[1::2], keys(rows)[1::2], **SMALL).tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bitmask_at_engine_sizes():
    rows, vocab = 256, 151_936
    logits, bitmask, mask_rows, premasked, allowed = masked_case(rows, vocab, device="cuda")
    t = torch.full((rows,), 0.6, device="cuda")
    t[::3] = 0.0
    k = keys(rows, device="cuda")
    out = gumbel_argmax(logits.bfloat16(), t, k, bitmask=bitmask, mask_rows=mask_rows)
    assert torch.equal(out, gumbel_argmax(premasked.bfloat16(), t, k))
    assert allowed[0::2].gather(1, out[0::2, None]).all()
