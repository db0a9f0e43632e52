"""The Sampler module on its own: distributions (chi-squared at fixed seeds), greedy
equivalences, seeded rows that ignore their batch, penalties, min_tokens and logprobs,
each against a direct computation."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from nanovllm.engine.sampling_batch import build_sampling_tensors
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, apply_penalties
from nanovllm.sampling_params import SamplingParams

EOS = 1
# a fixed 8-token logit vector: probabilities ~ .35 .21 .17 .10 .08 .05 .03 .01
LOGITS_8 = torch.tensor([2.0, 1.5, 1.3, 0.8, 0.5, 0.1, -0.4, -1.5])
NUM_DRAWS = 20_000
CHI2_Z = 3.09  # the standard normal quantile at 1 - 0.001: a false alarm one run in a thousand


def seq(params: SamplingParams, prompt=(5, 6, 7), output=()) -> Sequence:
    s = Sequence(list(prompt), params)
    s.token_ids.extend(output)
    return s


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def to_device(obj, device: str):
    changes = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in changes.items():
        if isinstance(value, torch.Tensor):
            changes[name] = value.to(device)
        elif dataclasses.is_dataclass(value):
            changes[name] = to_device(value, device)
    return dataclasses.replace(obj, **changes)


def sample(logits: torch.Tensor, seqs: list[Sequence], seed: int = 0, device: str = "cpu") -> torch.Tensor:
    tensors = to_device(build_sampling_tensors(seqs, frozenset({EOS})), device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return Sampler()(logits.to(device), tensors, generator).token_ids.cpu()


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-squared quantile at 1 - 0.001."""
    a = 2 / (9 * df)
    return df * (1 - a + CHI2_Z * math.sqrt(a)) ** 3


def truncated_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The expected distribution, computed directly in float64 (HF's order: top-k, top-p, min-p)."""
    z = logits.double().numpy() / temperature
    order = np.argsort(-z)
    keep = np.ones_like(z, dtype=bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_before = 0.0
    for i in order:  # descending: drop a token once the mass before it reaches top_p
        if keep[i] and mass_before >= top_p:
            keep[i] = False
        mass_before += p[i]
    p = np.where(keep, p, 0.0)
    keep &= p >= min_p * p.max()
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def assert_samples_from(tokens: torch.Tensor, expected: np.ndarray) -> None:
    counts = np.bincount(tokens.numpy(), minlength=len(expected))
    outside = counts[expected == 0].sum()
    assert outside == 0, f"{outside} draws outside the support {np.flatnonzero(expected)}: counts {counts}"
    support = expected > 0
    if support.sum() == 1:
        return
    e = expected[support] * len(tokens)
    chi2 = float(((counts[support] - e) ** 2 / e).sum())
    df = int(support.sum()) - 1
    assert chi2 < chi2_critical(df), f"chi2 {chi2:.1f} >= {chi2_critical(df):.1f} (df {df}): counts " \
                                     f"{counts.tolist()}, expected {np.round(e).tolist()}"


CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.6),             # keeps 3 tokens: .35 + .21 < .6 <= .35 + .21 + .17
    "min_p": dict(min_p=0.25),
    "top_k+top_p": dict(top_k=5, top_p=0.8),
    "all": dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_truncated_distribution_chi2(name, device):
    params = SamplingParams(**CASES[name])
    logits = LOGITS_8.expand(NUM_DRAWS, -1)
    tokens = sample(logits, [seq(params)] * NUM_DRAWS, seed=0, device=device)
    assert_samples_from(tokens, truncated_probs(LOGITS_8, **CASES[name]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_top_p", [False, True])   # top-k by torch.topk, or within the sort
def test_mixed_truncations_in_one_batch_chi2(with_top_p, device):
    # rows with different k (and none, and top-p) share one batch: each keeps its own set
    kinds = [dict(top_k=2), dict(top_k=5), dict(), dict(top_k=6, min_p=0.2)] + [dict(top_p=0.6)] * with_top_p
    seqs = [seq(SamplingParams(**kinds[i % len(kinds)])) for i in range(NUM_DRAWS)]
    tokens = sample(LOGITS_8.expand(NUM_DRAWS, -1), seqs, device=device)
    for j, kwargs in enumerate(kinds):
        assert_samples_from(tokens[j::len(kinds)], truncated_probs(LOGITS_8, **kwargs))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_sample_the_right_distribution(device):
    # every row draws from its own generator (seeds 0..n-1): the per-row path is a correct sampler too
    kwargs = CASES["top_k+top_p"]
    seqs = [seq(SamplingParams(seed=i, **kwargs)) for i in range(NUM_DRAWS // 4)]
    tokens = sample(LOGITS_8.expand(len(seqs), -1), seqs, device=device)
    assert_samples_from(tokens, truncated_probs(LOGITS_8, **kwargs))


def test_greedy_top_k_1_and_tiny_top_p_give_argmax():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(dim=-1)
    for kwargs in (dict(temperature=0), dict(top_k=1), dict(top_p=1e-9), dict(top_k=1, temperature=5.0),
                   dict(top_p=1e-9, min_p=0.5, seed=3)):
        seqs = [seq(SamplingParams(**kwargs))] * len(logits)
        for seed in range(3):
            assert torch.equal(sample(logits, seqs, seed), expected), kwargs


def test_mixed_batch_rows_match_their_own_pass():
    """One pass over greedy, top-k, top-p, min-p, penalized and seeded rows: the
    deterministic rows (greedy, seeded) give what they give alone."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 2
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(top_p=0.9, seed=11)),
            seq(SamplingParams(top_k=20)), seq(SamplingParams(min_p=0.1, seed=12, repetition_penalty=1.5), output=[4]),
            seq(SamplingParams(temperature=0, frequency_penalty=1.0), output=[logits[4].argmax().item()] * 3),
            seq(SamplingParams(temperature=0.5))]
    together = sample(logits, seqs, seed=5)
    for i in (0, 1, 3, 4):
        alone = sample(logits[i:i + 1], [seqs[i]], seed=99)
        assert together[i] == alone[0], f"row {i}"


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_ignores_batch_companions_and_position(device):
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, 500, generator=g)   # flat enough that the draw matters
    others = torch.randn(7, 500, generator=g)
    for output_len in range(5):               # the draw for each output position
        target = seq(SamplingParams(temperature=1.0, seed=1234), output=[9] * output_len)
        alone = sample(row, [target], seed=0, device=device)[0]
        for position in (0, 3, 7):
            logits = torch.cat([others[:position], row, others[position:]])
            companions = [seq(SamplingParams(seed=i if i % 2 else None)) for i in range(7)]
            seqs = companions[:position] + [target] + companions[position:]
            assert sample(logits, seqs, seed=position + 17, device=device)[position] == alone
    # not vacuous: the draws vary with the seed
    draws = {sample(row, [seq(SamplingParams(seed=s))])[0].item() for s in range(20)}
    assert len(draws) > 3


def test_row_seed_differs_by_position():
    row = torch.zeros(1, 1000)  # uniform: each position should draw afresh
    draws = [sample(row, [seq(SamplingParams(seed=5), output=[9] * n)])[0].item() for n in range(10)]
    assert len(set(draws)) > 5, draws


def direct_penalties(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """HF's repetition penalty (its own processor) then OpenAI's frequency/presence, by loops."""
    p = s.sampling_params
    out = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([s.token_ids]), logits[None].clone())[0]
    for token in set(s.completion_token_ids):
        count = s.completion_token_ids.count(token)
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_direct_computation():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 40, generator=g) * 3
    seqs = [seq(SamplingParams(repetition_penalty=1.7), prompt=[1, 2, 3, 3], output=[3, 4, 30, 30]),
            seq(SamplingParams(frequency_penalty=0.5, presence_penalty=-0.3), prompt=[7, 8], output=[8, 9, 9, 9]),
            seq(SamplingParams()),   # no penalty: untouched
            seq(SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.0, presence_penalty=2.0),
                prompt=[10, 11, 12], output=[12, 13, 13, 39])]
    tensors = build_sampling_tensors(seqs, frozenset({EOS}))
    penalized = logits.clone()
    apply_penalties(penalized, tensors.penalties)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(penalized[i], direct_penalties(logits[i], s), rtol=0, atol=1e-6)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 20)
    logits[0, EOS], logits[0, 7], logits[0, 3] = 10.0, 9.0, 8.0   # EOS, then stop id 7, then 3
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7])
    for output_len, expected in ((0, 3), (1, 3), (2, EOS)):
        assert sample(logits, [seq(params, output=[5] * output_len)])[0] == expected
    # ignore_eos: EOS is not a stop, so it is not masked; the stop id still is
    ignore = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    assert sample(logits, [seq(ignore)])[0] == EOS
    # sampling rows never draw a masked token either
    hot = SamplingParams(temperature=5.0, min_tokens=1, stop_token_ids=[7])
    tokens = sample(logits.expand(2000, -1), [seq(hot)] * 2000)
    assert not torch.isin(tokens, torch.tensor([EOS, 7])).any()


def test_logprobs_come_from_raw_logits():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, generator=g).to(torch.bfloat16)
    seqs = [seq(SamplingParams(temperature=0.5, top_k=5, logprobs=3, repetition_penalty=2.0), output=[1, 2]),
            seq(SamplingParams(temperature=0)),
            seq(SamplingParams(temperature=0, logprobs=0, presence_penalty=1.0), output=[4])]
    tensors = build_sampling_tensors(seqs, frozenset({EOS}))
    out = Sampler()(logits, tensors, torch.Generator().manual_seed(0))
    raw = torch.log_softmax(logits.float(), dim=-1)
    lp = out.logprobs
    rows = [0, 2]
    for j, row in enumerate(rows):
        torch.testing.assert_close(lp.sampled[j], raw[row, out.token_ids[row]])
        values, ids = raw[row].topk(3)
        assert lp.top_ids[j].tolist() == ids.tolist()
        torch.testing.assert_close(lp.top_values[j], values)
    assert tensors.num_logprobs == (3, -1, 0)


def test_input_logits_untouched_and_float32_temperature():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    before = logits.clone()
    sample(logits, [seq(SamplingParams(temperature=0.3, top_p=0.5, repetition_penalty=1.2))] * 4)
    assert torch.equal(logits, before)


def test_no_vocabulary_sort_without_top_p(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sorted the vocabulary")
    monkeypatch.setattr(torch.Tensor, "sort", refuse)
    monkeypatch.setattr(torch, "sort", refuse)
    monkeypatch.setattr(torch.Tensor, "argsort", refuse)
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(7))
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(top_k=10, seed=1)), seq(SamplingParams(min_p=0.2)),
            seq(SamplingParams(temperature=0.6, frequency_penalty=0.5), output=[3])] * 2
    tokens = sample(logits, seqs)
    assert tokens[0] == logits[0].argmax()
    with pytest.raises(AssertionError, match="sorted"):   # and top-p does sort
        sample(logits, [seq(SamplingParams(top_p=0.9))] * 8)
