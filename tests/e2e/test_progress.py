"""generate's progress bar counts output tokens: it moves before any request finishes,
its total is the token budget, shrunk to what was really generated, and it ends on
every generated token with a throughput above zero."""
import re

import pytest

import nanovllm.engine.progress as progress
from nanovllm import LLM, SamplingParams
from tests.conftest import VOCAB


class RecordingTqdm(progress.tqdm):
    """Records (n, total, postfix) at every update."""
    bars: list["RecordingTqdm"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial_total = self.total
        self.history = []
        RecordingTqdm.bars.append(self)

    def update(self, n=1):
        super().update(n)
        self.history.append((self.n, self.total, self.postfix))


@pytest.fixture
def bars(monkeypatch):
    RecordingTqdm.bars = []
    monkeypatch.setattr(progress, "tqdm", RecordingTqdm)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)  # count after every step
    return RecordingTqdm.bars


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint(), device="cpu", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=64)
    yield engine
    engine.exit()


def test_bar_counts_output_tokens_and_shrinks_to_early_stops(llm, bars):
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=list(range(VOCAB)))]  # stops at 1
    outs = llm.generate(prompts, params)
    (bar,) = bars
    assert bar.initial_total == 3 + 2 * 17 + 40  # every sample's budget
    generated = sum(len(c["token_ids"]) for o in outs for c in o.get("outputs", [o]))
    assert generated == 3 + 2 * 17 + 1
    assert bar.n == bar.total == generated
    counts = [n for n, _, _ in bar.history]
    assert counts == sorted(counts)
    # tokens count between request completions (a bar over requests would stand still there)
    assert any(n1 > n0 and p1 == p0 for (n0, _, p0), (n1, _, p1) in zip(bar.history, bar.history[1:]))
    assert bar.history[-1][2] == "requests 3/3"
    rate = re.search(r"([\d.]+)tok/s", bar.format_meter(**bar.format_dict))
    assert rate and float(rate.group(1)) > 0


def test_no_bar_when_not_asked(llm, bars):
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert all(bar.disable for bar in bars)
