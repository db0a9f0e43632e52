"""Overlap scheduling: step N+1 is scheduled and launched before step N's output is
processed. It must change nothing a request produces, whatever ends it (EOS, stop ids,
stop strings, max_tokens, max_model_len), under preemption and chunking, with n > 1,
logprobs and penalties; and it must really defer (the next step reads the previous
step's ids on the device).

The oracle is the same engine with `enable_overlap=False` (itself checked against HF by
the other suites), so every comparison here is exact."""
import random

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import model_runner as model_runner_module
from tests.conftest import VOCAB
from tests.e2e.test_invariance import assert_engine_is_empty, completions

MAX_MODEL_LEN = 256
EOS = 1


def workload(seed: int = 7, num: int = 36) -> tuple[list[list[int]], list[SamplingParams]]:
    """Mixed requests; stop ids and strings common enough that many end early."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(num):
        max_tokens = rng.randint(1, 24)
        n = rng.randint(1, MAX_MODEL_LEN - max_tokens)
        prompts.append([rng.randrange(3, VOCAB) for _ in range(n)])
        kind = i % 6
        common = dict(max_tokens=max_tokens, seed=rng.randrange(1 << 30))
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens))     # EOS may stop it
        elif kind == 1:
            params.append(SamplingParams(temperature=1.0, stop_token_ids=list(range(3, 60)), **common))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.8, stop=["a", "e", "o"], **common))
        elif kind == 3:
            params.append(SamplingParams(temperature=1.0, n=2, logprobs=3, min_tokens=min(2, max_tokens), **common))
        elif kind == 4:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=1.2, top_k=20, top_p=0.9, ignore_eos=True, **common))
    return prompts, params


def full_output(out: dict) -> list[tuple]:
    """Tokens, finish reason, text and the logprob entries' token ids (their values are
    compared separately: another batch composition rounds float32 differently)."""
    samples = out.get("outputs", [out])
    return [c + (_logprob_ids(s),) for s, c in zip(samples, completions(out))]


def _logprob_ids(sample: dict):
    entries = sample.get("logprobs")
    return None if entries is None else [(e["token_id"], list(e["top_logprobs"])) for e in entries]


def logprob_values(out: dict) -> list[float]:
    return [v for s in out.get("outputs", [out]) for e in s.get("logprobs") or []
            for v in [e["logprob"], *e["top_logprobs"].values()]]


def count_deferred(monkeypatch) -> list[int]:
    """Record, per launched step, how many input ids came from the previous step's
    sampled ids on the device."""
    counts = []
    launch = model_runner_module.ModelRunner.launch   # every step's forward (`run` calls it)

    def spy(self, inputs):
        counts.append(0 if inputs.deferred_index is None else len(inputs.deferred_index))
        return launch(self, inputs)
    monkeypatch.setattr(model_runner_module.ModelRunner, "launch", spy)
    return counts


CONFIGS = {
    "roomy": dict(kvcache_block_size=16, num_kvcache_blocks=512),
    "preempting-chunked": dict(kvcache_block_size=16, num_kvcache_blocks=MAX_MODEL_LEN // 16 + 2,
                               max_num_batched_tokens=40),
    "block256-no-prefix-cache": dict(kvcache_block_size=256, num_kvcache_blocks=3, enable_prefix_caching=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_overlap_changes_no_output(checkpoint, monkeypatch, name):
    path = checkpoint("qwen3")
    prompts, params = workload()
    results, values = {}, {}
    for overlap in (False, True):
        llm = LLM(path, max_model_len=MAX_MODEL_LEN, enable_overlap=overlap, **CONFIGS[name])
        deferred = count_deferred(monkeypatch)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert_engine_is_empty(llm)
        if "preempting" in name:
            assert llm.scheduler.num_preemptions > 0
        # overlap really defers: steps read ids the host had not seen; without it, none do
        assert (sum(deferred) > 0) == overlap
        results[overlap] = [full_output(o) for o in outs]
        values[overlap] = [logprob_values(o) for o in outs]
        monkeypatch.undo()
        llm.exit()
    reasons = {c[1] for out in results[False] for c in out}
    assert reasons == {"stop", "length"}, "the workload must end requests both ways"
    for i, (want, got) in enumerate(zip(results[False], results[True])):
        assert got == want, f"request {i}: overlap {got} != sync {want}"
        assert values[True][i] == pytest.approx(values[False][i], abs=1e-4), f"request {i}: logprobs differ"


def test_no_token_past_a_stop_and_no_block_past_the_limit(checkpoint):
    """Requests that end on the step before the last: the step launched meanwhile must
    neither add a token nor leave a block taken."""
    path = checkpoint("qwen3")
    prompts = [[5 + i] * (MAX_MODEL_LEN - 4) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(path, max_model_len=MAX_MODEL_LEN, kvcache_block_size=16, num_kvcache_blocks=8 * 16)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o["token_ids"]) == 4 and o["finish_reason"] == "length" for o in outs)
    # stop ids: whatever each request's first token is, stopping on it ends after one token
    firsts = [o["token_ids"][0] for o in outs]
    stopped = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[t]) for t in firsts],
                           use_tqdm=False)
    assert [o["token_ids"] for o in stopped] == [[t] for t in firsts]
    assert all(o["finish_reason"] == "stop" and o["stop_reason"] == t for o, t in zip(stopped, firsts))
    assert_engine_is_empty(llm)
    llm.exit()


def test_penalties_wait_for_every_token(checkpoint, monkeypatch):
    """A penalty needs the full output history on the host: no step defers while such a
    request runs, and outputs equal the synchronous engine's."""
    path = checkpoint("qwen3")
    prompts = [[7] * 20, [9] * 33]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                            frequency_penalty=0.5)
    outs = {}
    for overlap in (False, True):
        llm = LLM(path, max_model_len=MAX_MODEL_LEN, kvcache_block_size=16, num_kvcache_blocks=64,
                  enable_overlap=overlap)
        deferred = count_deferred(monkeypatch)
        outs[overlap] = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert sum(deferred) == 0
        monkeypatch.undo()
        llm.exit()
    assert outs[True] == outs[False]
