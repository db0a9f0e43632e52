"""Tensor parallelism on CPU: two ranks over gloo, the second in a spawned process."""
import os
import threading
import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import worker
from nanovllm.engine.worker import WorkerDied
from tests.conftest import VOCAB
from tests.helpers import assert_greedy_matches_hf, needs_two_ranks, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def our_shm() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"nanovllm_{os.getpid()}_")}


def generate(llm: LLM, prompts) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("variant", ["qwen3", "qwen3-tied-mha"])
@needs_two_ranks
def test_tp2_matches_tp1_and_hf(checkpoint, variant, monkeypatch):
    path = checkpoint(variant)
    prompts = random_prompts([1, 7, 40, 257, 30, 30, 30, 30], VOCAB, seed=7)
    # chunked prefill (tiny budget) and preemption (tiny cache) in the same run; a tiny
    # message buffer forces the grow-on-demand path of the control channel
    config = dict(kvcache_block_size=16, max_model_len=512, max_num_batched_tokens=64, num_kvcache_blocks=24)
    tp1 = LLM(path, **config)
    expected = generate(tp1, prompts)
    tp1.exit()
    monkeypatch.setattr(worker, "INITIAL_BUFFER_BYTES", 512)
    tp2 = LLM(path, tensor_parallel_size=2, **config)
    try:
        got = generate(tp2, prompts)
        assert tp2.scheduler.num_preemptions > 0
        assert tp2.workers.shm.size > 512, "the control buffer should have grown"
    finally:
        tp2.exit()
    for prompt, a, b in zip(prompts, expected, got):
        assert_greedy_matches_hf(path, prompt, b)
        assert a == b
    assert not our_shm(), "shared memory left behind"


@needs_two_ranks
def test_two_tp_instances_in_a_row(checkpoint):
    prompts = random_prompts([5, 50], VOCAB, seed=8)
    outs = []
    for _ in range(2):
        llm = LLM(checkpoint("qwen3"), kvcache_block_size=16, max_model_len=256, tensor_parallel_size=2,
                  num_kvcache_blocks=64)
        outs.append(generate(llm, prompts))
        procs = llm.workers.procs
        llm.exit()
        assert all(not p.is_alive() for p in procs)
        assert not our_shm()
    assert outs[0] == outs[1]


@needs_two_ranks
def test_dead_worker_raises_instead_of_hanging(checkpoint):
    llm = LLM(checkpoint("qwen3"), kvcache_block_size=16, max_model_len=512, tensor_parallel_size=2,
              num_kvcache_blocks=128)
    try:
        long_run = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        threading.Timer(0.5, llm.workers.procs[0].kill).start()
        start = time.monotonic()
        with pytest.raises(WorkerDied, match="rank 1"):
            llm.generate(random_prompts([20] * 4, VOCAB), long_run, use_tqdm=False)
        assert time.monotonic() - start < 30
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        with pytest.raises(WorkerDied):  # and keeps saying so, at once
            llm.generate([[5, 6]], GREEDY, use_tqdm=False)
    finally:
        llm.exit()
    assert not our_shm()


def test_invalid_tp_size_is_a_clear_error(checkpoint):
    # 4 attention heads cannot be split over 3 ranks
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide num_attention_heads"):
        LLM(checkpoint("qwen3"), kvcache_block_size=16, max_model_len=256, tensor_parallel_size=3)
