"""The per-step sampling tensors: requests whose settings objects differ share one build
only where every setting the sampler reads agrees. CPU only, no model."""
import pytest

from nanovllm import SamplingParams
from nanovllm.engine.sampling_batch import build_sampling_tensors
from nanovllm.engine.sequence import Sequence

EOS = 1
BASE = dict(temperature=0.7, ignore_eos=False)
# each sampler setting with two values; the rows differ in it alone (and in max_tokens)
SETTINGS = [("temperature", 0.7, 1.3), ("top_k", 0, 5), ("top_p", 1.0, 0.5), ("min_p", 0.0, 0.2),
            ("seed", None, 11), ("min_tokens", 0, 3), ("logprobs", None, 2), ("repetition_penalty", 1.0, 1.5),
            ("presence_penalty", 0.0, 0.5), ("frequency_penalty", 0.0, -0.5)]


def rows(tensors, name: str) -> list:
    """Each row's value of one setting, as the sampler will see it."""
    if name == "temperature":
        return tensors.temperatures.tolist()
    if name in ("top_k", "top_p", "min_p"):
        column = getattr(tensors, name)
        return None if column is None else column.tolist()
    if name == "seed":
        return [i in tensors.seeded_rows for i in range(2)]
    if name == "min_tokens":
        return sorted(set(tensors.banned_rows.tolist())) if tensors.banned_rows is not None else []
    if name == "logprobs":
        return list(tensors.num_logprobs)
    penalties = tensors.penalties
    column = {"repetition_penalty": "repetition", "presence_penalty": "presence",
              "frequency_penalty": "frequency"}[name]
    return None if penalties is None else getattr(penalties, column).tolist()


@pytest.mark.parametrize("swap", [False, True])  # the setting's other value in either row
@pytest.mark.parametrize("name,plain,other", SETTINGS)
def test_rows_that_differ_in_one_setting_keep_their_own_values(name, plain, other, swap):
    values = [other, plain] if swap else [plain, other]
    seqs = [Sequence([5, 6, 7], SamplingParams(**{**BASE, name: v}, max_tokens=8 + i)) for i, v in enumerate(values)]
    got = rows(build_sampling_tensors(seqs, frozenset({EOS})), name)
    alone = [rows(build_sampling_tensors([seq], frozenset({EOS})), name) for seq in seqs]
    if name == "seed":
        assert got == [v is not None for v in values]
        return
    if name == "min_tokens":
        assert got == [values.index(other)]  # only that row is below its min_tokens: EOS is banned there alone
        return
    if name in ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        default = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}.get(name, 0.0)
        assert got == [default if a is None else pytest.approx(a[0]) for a in alone]
    else:
        assert got == [pytest.approx(a[0]) for a in alone]
    assert got[0] != got[1]


def test_requests_that_differ_only_in_max_tokens_share_every_column():
    seqs = [Sequence([5, 6], SamplingParams(temperature=0.6, top_p=0.9, max_tokens=m)) for m in range(4, 10)]
    tensors = build_sampling_tensors(seqs, frozenset({EOS}))
    assert tensors.temperatures.tolist() == pytest.approx([0.6] * 6)
    assert tensors.top_p.tolist() == pytest.approx([0.9] * 6)
    assert tensors.top_k is None and tensors.min_p is None and tensors.penalties is None
