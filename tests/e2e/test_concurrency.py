"""One engine runs one generate() or stream() at a time: a second caller (another thread,
a second stream, a generate inside a stream loop) is refused at once with a RuntimeError,
and the running call's results are exactly a lone caller's. An abandoned stream never
breaks a later call, and an exited LLM refuses work."""
import gc
import threading

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import VOCAB
from tests.e2e.test_invariance import assert_engine_is_empty
from tests.helpers import random_prompts

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=256)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = random_prompts([3, 9, 17], VOCAB, seed=11)
BUSY = r"already running a generate\(\)/stream\(\).*finish or close it first"


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint("qwen3"), **ENGINE)
    yield engine
    engine.exit()


def token_ids(llm: LLM) -> list[list[int]]:
    return [out["token_ids"] for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def expected(llm) -> list[list[int]]:
    """A lone caller's results."""
    return token_ids(llm)


def streamed(deltas) -> dict[int, list[int]]:
    """prompt index -> the token ids its deltas carried."""
    out = {}
    for delta in deltas:
        out.setdefault(delta["index"], []).extend(delta["token_ids"])
    return out


def test_a_second_thread_is_refused_while_the_first_runs_unharmed(llm, expected, monkeypatch):
    inside, release = threading.Event(), threading.Event()
    real_step = llm.step

    def step():  # hold the first caller mid-run until the second has been turned away
        inside.set()
        release.wait(10)
        return real_step()
    monkeypatch.setattr(llm, "step", step)
    results, errors = [], []
    first = threading.Thread(target=lambda: results.append(token_ids(llm)))
    first.start()
    assert inside.wait(10)
    for call in (lambda: llm.generate(PROMPTS, GREEDY, use_tqdm=False), lambda: llm.stream(PROMPTS, GREEDY)):
        second = threading.Thread(target=lambda c=call: errors.append(pytest.raises(RuntimeError, c)))
        second.start()
        second.join(10)
    release.set()
    first.join(30)
    monkeypatch.undo()
    assert len(errors) == 2 and all("already running" in str(e.value) for e in errors)
    assert results == [expected]
    assert_engine_is_empty(llm)


def test_interleaved_streams_the_second_is_refused(llm, expected):
    s1 = llm.stream(PROMPTS, GREEDY)
    s2 = llm.stream([[100, 101]], GREEDY)  # made before s1 ran: refused at its first next()
    first = next(s1)
    with pytest.raises(RuntimeError, match=BUSY):
        next(s2)
    with pytest.raises(RuntimeError, match=rf"stream\(\): .*{BUSY}"):
        llm.stream([[100, 101]], GREEDY)  # made while s1 runs: refused at once
    got = streamed([first, *s1])
    assert [got[i] for i in range(len(PROMPTS))] == expected  # s1 alone, every index its own
    assert list(s2) == []  # s2 failed and is finished; nothing of it was queued
    assert token_ids(llm) == expected


def test_generate_inside_a_stream_loop_is_refused_and_the_stream_goes_on(llm, expected):
    deltas, refusals = [], 0
    for delta in llm.stream(PROMPTS, GREEDY):
        deltas.append(delta)
        with pytest.raises(RuntimeError, match=rf"generate\(\): .*{BUSY}"):
            llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
        refusals += 1
    got = streamed(deltas)
    assert [got[i] for i in range(len(PROMPTS))] == expected and refusals == len(deltas)


def test_a_closed_stream_frees_the_engine(llm, expected):
    s1 = llm.stream(PROMPTS, GREEDY)
    next(s1)
    s1.close()
    assert_engine_is_empty(llm)
    assert token_ids(llm) == expected


def test_an_abandoned_stream_collected_later_never_breaks_a_call(llm, expected, monkeypatch):
    stream = llm.stream(PROMPTS, GREEDY)
    next(stream)
    cycle = [stream]
    cycle.append(cycle)  # only the cycle collector can free it now
    del stream, cycle
    real_step, steps = llm.step, []

    def step():  # the collector runs in the middle of the next call
        steps.append(1)
        if len(steps) == 2:
            gc.collect()
        return real_step()
    monkeypatch.setattr(llm, "step", step)
    assert token_ids(llm) == expected
    monkeypatch.undo()
    assert_engine_is_empty(llm)


def test_after_exit_every_call_is_a_clear_error(checkpoint):
    engine = LLM(checkpoint("qwen3"), **ENGINE)
    engine.exit()
    for call in (lambda: engine.generate(PROMPTS, GREEDY, use_tqdm=False), lambda: engine.stream(PROMPTS, GREEDY)):
        with pytest.raises(RuntimeError, match=r"shut down \(exit\(\) was called\)"):
            call()
