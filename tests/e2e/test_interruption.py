"""An exception or Ctrl-C inside `generate` leaves the LLM usable: every block freed, no
request left queued, and the next call's results equal a fresh engine's. Deleting an LLM
and making another in the same process works, on one CPU rank and on two."""
import os
import random
import signal

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import VOCAB
from tests.e2e.test_invariance import assert_engine_is_empty, completions
from tests.e2e.test_tensor_parallel import our_shm
from tests.helpers import needs_two_ranks, random_prompts

# 20 blocks of 16 under 16 prompts of up to 144 tokens (a shared stem) with up to 64 more, and
# a 64-token budget: the run chunks, preempts (~15 times) and hits the prefix cache over ~160
# steps, requests still waiting for the first ~110, so an interruption finds all of that in flight
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=20, max_model_len=256, max_num_batched_tokens=64)


class Injected(Exception):
    pass


def make_workload(num: int = 16, seed: int = 5, max_tokens: tuple[int, int] = (16, 64)
                  ) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    stem = random_prompts([96], VOCAB, seed=seed)[0]
    prompts = [stem[:rng.randint(0, 96)] + p for p in random_prompts([rng.randint(1, 48) for _ in range(num)],
                                                                     VOCAB, seed=seed + 1)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(*max_tokens), ignore_eos=True) if i % 3 == 0 else
              SamplingParams(temperature=1.0, max_tokens=rng.randint(*max_tokens), seed=i, n=1 + (i % 3 == 1))
              for i in range(num)]
    return prompts, params


WORKLOAD = make_workload()


def run(llm: LLM, workload=WORKLOAD) -> list[list[tuple]]:
    outs = llm.generate(*workload, use_tqdm=False)
    assert_engine_is_empty(llm)
    return [completions(out) for out in outs]


@pytest.fixture(scope="module")
def path(checkpoint) -> str:
    return checkpoint("qwen3")


@pytest.fixture(scope="module")
def expected(path) -> list[list[tuple]]:
    llm = LLM(path, **ENGINE)
    outs = run(llm)
    assert llm.scheduler.num_preemptions > 0
    llm.exit()
    return outs


@pytest.fixture(scope="module")
def llm(path):
    engine = LLM(path, **ENGINE)
    yield engine
    engine.exit()


class Injector:
    """Replaces `owner.name` so its `nth` call raises `exc_type` (before or after the real
    call), and records the engine's state at that moment."""

    def __init__(self, monkeypatch, llm: LLM, owner, name: str, nth: int, exc_type: type, after: bool = False):
        self.calls, self.state = 0, None
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            result = real(*args, **kwargs) if after or self.calls != nth else None
            if self.calls == nth:
                bm = llm.block_manager
                self.state = dict(used_blocks=bm.num_blocks - bm.num_free_blocks, waiting=len(llm.scheduler.waiting),
                                  running=len(llm.scheduler.running))
                raise exc_type("injected")
            return result
        monkeypatch.setattr(owner, name, wrapper)


INJECTIONS = {
    # id: (where, the call that fails, exception, raise after the real call)
    "model forward raises": ("model_runner.run", 30, Injected, False),
    "KeyboardInterrupt in the model forward": ("model_runner.run", 20, KeyboardInterrupt, False),
    "schedule raises after allocating": ("scheduler.schedule", 45, Injected, True),
    "output bookkeeping raises": ("scheduler.on_output", 60, Injected, False),
    "output processing raises after finishing some": ("outputs.process", 80, Injected, True),
}


@pytest.mark.parametrize("case", list(INJECTIONS))
def test_exception_mid_run_leaves_the_engine_usable(llm, expected, monkeypatch, case):
    where, nth, exc_type, after = INJECTIONS[case]
    owner_name, name = where.split(".")
    injector = Injector(monkeypatch, llm, getattr(llm, owner_name), name, nth, exc_type, after)
    with pytest.raises(exc_type, match="injected"):
        llm.generate(*WORKLOAD, use_tqdm=False)
    monkeypatch.undo()
    # it struck mid-run: blocks held, requests both running and waiting
    assert injector.state["used_blocks"] > 0 and injector.state["running"] > 0 and injector.state["waiting"] > 0
    assert_engine_is_empty(llm)
    assert run(llm) == expected


def test_stream_interrupted_then_generate(llm, expected, monkeypatch):
    Injector(monkeypatch, llm, llm.model_runner, "run", 10, Injected)
    deltas = llm.stream(*WORKLOAD)
    with pytest.raises(Injected):
        for _ in deltas:
            pass
    monkeypatch.undo()
    assert_engine_is_empty(llm)
    assert run(llm) == expected


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler, as in a terminal: a shell that starts pytest in the
    background hands it SIGINT ignored, and a real SIGINT would then do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def sigint_inside(monkeypatch, owner, name: str, nth: int, after: bool) -> list[str]:
    """Make the `nth` call of `owner.name` send this process a real SIGINT, before or
    after doing its work. Returns a log: 'sent' once the signal went (a KeyboardInterrupt
    raised at once would skip it), 'returned' each time a call ends."""
    log, calls = [], [0]
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            os.kill(os.getpid(), signal.SIGINT)
            log.append("sent")
        result = real(*args, **kwargs)
        log.append("returned")
        if calls[0] == nth and after:
            os.kill(os.getpid(), signal.SIGINT)
            log.append("sent")
        return result
    monkeypatch.setattr(owner, name, wrapper)
    return log


@pytest.mark.parametrize("where,after", [
    ("model_runner.run", False),         # the forward (on TP, the ranks' collectives) runs to its end
    ("block_manager.allocate", True),    # a sequence holds blocks but is in neither queue yet
    ("scheduler._preempt", True),
    ("block_manager.commit", True),
    ("outputs.process", True),
], ids=["forward", "allocate", "preempt", "commit", "output processing"])
def test_ctrl_c_waits_for_the_step_to_end(llm, expected, monkeypatch, python_sigint, where, after):
    """A real SIGINT mid-step, in the forward or in the scheduler's bookkeeping, is held
    until the step is done, then raised with every block freed."""
    owner_name, name = where.split(".")
    handler = signal.getsignal(signal.SIGINT)
    nth = {"_preempt": 2, "allocate": 20}.get(name, 40)  # mid-run: of ~14, ~35 and ~160 calls
    log = sigint_inside(monkeypatch, getattr(llm, owner_name), name, nth, after)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(*WORKLOAD, use_tqdm=False)
    monkeypatch.undo()
    assert_engine_is_empty(llm)
    assert "sent" in log  # not raised at once: the call went on
    if not after:
        assert log[-2:] == ["sent", "returned"]  # and the forward ran to its end
    assert signal.getsignal(signal.SIGINT) is handler
    assert run(llm) == expected


@pytest.mark.parametrize("user_handler", ["ignore", "custom"])
def test_ctrl_c_with_the_users_own_handler_is_theirs(llm, monkeypatch, user_handler):
    """The deferral applies over Python's default handler only: SIG_IGN keeps ignoring,
    a custom handler is called (here it just records), and generate carries on."""
    workload = make_workload(num=3, seed=7, max_tokens=(4, 8))  # short: one signal is all it needs
    reference = run(llm, workload)
    calls = []
    handler = signal.SIG_IGN if user_handler == "ignore" else lambda signum, frame: calls.append(signum)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        log = sigint_inside(monkeypatch, llm.model_runner, "run", 2, after=False)
        assert run(llm, workload) == reference  # no KeyboardInterrupt
        monkeypatch.undo()
        assert "sent" in log and signal.getsignal(signal.SIGINT) is handler
        assert calls == ([] if user_handler == "ignore" else [signal.SIGINT])
    finally:
        signal.signal(signal.SIGINT, previous)


def test_delete_and_make_another(path, expected):
    llm = LLM(path, **ENGINE)
    with pytest.MonkeyPatch.context() as mp:
        Injector(mp, llm, llm.model_runner, "run", 5, Injected)
        with pytest.raises(Injected):
            llm.generate(*WORKLOAD, use_tqdm=False)
    finalizer = llm._finalizer
    del llm
    assert not finalizer.alive, "the LLM outlived its last reference (a reference cycle?)"
    llm = LLM(path, **ENGINE)
    assert run(llm) == expected


# ---- tensor parallelism on CPU -----------------------------------------------------------------

@needs_two_ranks
def test_tp2_interruptions_between_and_inside_steps(path, monkeypatch, python_sigint):
    """Rank 0 fails between steps (in `schedule`, so the worker stays in lockstep) and is
    Ctrl-C'd inside a step; both times the next call's results are unchanged. Then the LLM
    is deleted (no exit(), no gc) and a second TP engine starts in the same process."""
    workload = make_workload(num=10, seed=6, max_tokens=(4, 16))  # steps over gloo are slow: a shorter run
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    procs = llm.workers.procs
    try:
        reference = run(llm, workload)

        injector = Injector(monkeypatch, llm, llm.scheduler, "schedule", 8, Injected)
        with pytest.raises(Injected):
            llm.generate(*workload, use_tqdm=False)
        monkeypatch.undo()
        assert injector.state["used_blocks"] > 0
        assert_engine_is_empty(llm)
        assert run(llm, workload) == reference

        log = sigint_inside(monkeypatch, llm.model_runner, "run", 6, after=False)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(*workload, use_tqdm=False)
        monkeypatch.undo()
        assert log[-2:] == ["sent", "returned"]
        assert_engine_is_empty(llm)
        assert run(llm, workload) == reference
    except BaseException:
        llm.exit()
        raise
    finalizer = llm._finalizer
    del llm  # the finalizer stops the worker and frees the process group and shared memory
    assert not finalizer.alive
    assert all(not p.is_alive() for p in procs)
    assert not our_shm()

    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        assert run(llm, workload) == reference
    finally:
        llm.exit()
    assert not our_shm()
