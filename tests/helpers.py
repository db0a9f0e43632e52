"""Test helpers: the HF oracle and tie-tolerant greedy agreement."""
import functools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

TIE_TOL = 1e-4  # two logits closer than this are a tie in float32

# Tensor-parallel tests run 2 ranks: gloo processes on CPU, or 2 GPUs when CUDA is there.
needs_two_ranks = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                     reason="tensor parallelism on CUDA needs 2 GPUs")


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    """HF's logits at every position of `token_ids`: [len, vocab]."""
    return hf_model(path)(torch.tensor([token_ids])).logits[0].float()


def assert_greedy_matches_hf(path: str, prompt: list[int], completion: list[int]) -> None:
    """Each generated token must be HF's argmax given everything before it (teacher
    forcing over prompt + completion in one HF pass), up to float32 ties."""
    assert_greedy_matches(hf_logits(path, prompt + completion), len(prompt), completion)


def assert_greedy_matches(logits: torch.Tensor, prompt_len: int, completion: list[int]) -> None:
    """`logits`: the oracle's [prompt_len + len(completion), vocab] logits, teacher-forced."""
    for step, token in enumerate(completion):
        row = logits[prompt_len - 1 + step]
        best = row.max().item()
        assert row[token].item() >= best - TIE_TOL, (
            f"step {step}: generated {token} (logit {row[token].item():.6f}) but HF's argmax is "
            f"{row.argmax().item()} (logit {best:.6f}); prompt length {prompt_len}")


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
