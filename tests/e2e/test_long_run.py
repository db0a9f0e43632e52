"""A long batch job keeps flat memory: 1,000 short requests with every output feature
(seeds, n = 2, stop strings and ids, logprobs, min_tokens, penalties) through a cache
small enough to preempt, twice. The second run must not grow the process's RSS beyond a
bound, must leave no per-request state in the engine and no `Sequence` alive, and must
reproduce the first run's outputs."""
import gc
import random

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from tests.conftest import VOCAB
from tests.e2e.test_invariance import assert_engine_is_empty

NUM_REQUESTS = 1000
MAX_RSS_GROWTH_MB = 50
# 12 blocks of 16, three of the longest requests (64 tokens): decodes preempt
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=12, max_model_len=64, max_num_seqs=128,
              max_num_batched_tokens=512)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def make_workload(seed: int = 11) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    stem = [rng.randrange(3, VOCAB) for _ in range(40)]
    kinds = [
        lambda: SamplingParams(temperature=0, max_tokens=rng.randint(1, 4)),
        lambda: SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 4), seed=rng.randrange(1 << 20)),
        lambda: SamplingParams(temperature=0.8, max_tokens=3, seed=rng.randrange(1 << 20), n=2, logprobs=2),
        lambda: SamplingParams(temperature=0, max_tokens=4, stop=["t1", "t3 t"], stop_token_ids=[7, 9]),
        lambda: SamplingParams(temperature=0.9, max_tokens=4, min_tokens=2, seed=rng.randrange(1 << 20),
                               repetition_penalty=1.2, presence_penalty=0.5, top_k=8, top_p=0.9),
    ]
    prompts, params = [], []
    for _ in range(NUM_REQUESTS):
        tail = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))]
        prompts.append(stem[:rng.choice([0, 0, 16, 33, 40])] + tail)
        params.append(rng.choice(kinds)())
    return prompts, params


def live_sequences() -> int:
    return sum(type(o) is Sequence for o in gc.get_objects())


def outputs(outs: list[dict]) -> list:
    """What must repeat exactly: everything but the timings and the logprob values (a
    prefix-cache hit reuses K/V computed in another batch: with several CPU threads its
    float32 rounding may differ in the last bits)."""
    return [[(s["token_ids"], s["text"], s["finish_reason"], s["stop_reason"],
              [(e["token_id"], list(e["top_logprobs"])) for e in s.get("logprobs", [])])
             for s in out.get("outputs", [out])] for out in outs]


def logprob_values(outs: list[dict]) -> list[float]:
    return [value for out in outs for s in out.get("outputs", [out]) for e in s.get("logprobs", [])
            for value in (e["logprob"], *e["top_logprobs"].values())]


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint("qwen3"), **ENGINE)
    yield engine
    engine.exit()


def test_a_thousand_requests_twice_with_flat_memory(llm):
    prompts, params = make_workload()
    first = llm.generate(prompts, params, use_tqdm=False)  # warmup: allocator pools, caches, lazy imports
    assert_engine_is_empty(llm)
    assert llm.scheduler.num_preemptions > 0
    for prompt, q, out in zip(prompts, params, first):
        assert out["prompt_token_ids"] == prompt
        for sample in out.get("outputs", [out]):
            assert 1 <= len(sample["token_ids"]) <= q.max_tokens
            assert sample["finish_reason"] in ("stop", "length")
    expected, expected_logprobs = outputs(first), logprob_values(first)
    del first
    gc.collect()
    sequences, rss = live_sequences(), rss_mb()

    second = llm.generate(prompts, params, use_tqdm=False)
    assert_engine_is_empty(llm)
    assert outputs(second) == expected
    assert logprob_values(second) == pytest.approx(expected_logprobs, abs=1e-4)
    del second
    gc.collect()
    assert live_sequences() == sequences, "Sequence objects outlived their generate call"
    growth = rss_mb() - rss
    assert growth < MAX_RSS_GROWTH_MB, f"RSS grew by {growth:.1f} MB over a second {NUM_REQUESTS}-request run"
