"""Structured outputs on CUDA: xgrammar's bitmask kernel against our torch unpacking, and
constrained generation in bf16 on the Qwen3-0.6B config (151,936 logits, a ~320-token
byte-level tokenizer: the ids past it must never be sampled). Skips without CUDA."""
import gc

import pytest
import torch

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.layers.grammar_mask import GrammarMask, apply_grammar_mask, unpack_bitmask  # noqa: E402
from nanovllm.utils.random_checkpoint import QWEN3_0_6B_CONFIG  # noqa: E402
from tests.e2e.test_structured_outputs import (EOS, REGEX, SCHEMA, TOKENIZER_VOCAB, assert_valid,  # noqa: E402
                                               make_byte_level_checkpoint)

pytestmark = pytest.mark.cuda
VOCAB = QWEN3_0_6B_CONFIG["vocab_size"]


def test_cuda_mask_matches_the_torch_unpacking():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g).cuda()
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, (VOCAB + 31) // 32), dtype=torch.int32, generator=g)
    rows = torch.tensor([0, 2, 5])
    got = logits.clone()
    apply_grammar_mask(got, GrammarMask(bitmask[rows], rows).to(torch.device("cuda")))
    want = logits.cpu().clone()
    want[rows] = want[rows].masked_fill(~unpack_bitmask(bitmask[rows], VOCAB), float("-inf"))
    assert torch.equal(got.cpu(), want)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    config = {**QWEN3_0_6B_CONFIG, "eos_token_id": EOS, "bos_token_id": 2}
    return make_byte_level_checkpoint(str(tmp_path_factory.mktemp("qwen3-0.6b-bytes")), config, seed=0,
                                      dtype=torch.bfloat16, init_range=0.05)


def run(path: str, params, **config) -> tuple[list[dict], LLM]:
    """The outputs, and the (exited) engine: its compiled grammars check them."""
    llm = LLM(path, max_model_len=1024, num_kvcache_blocks=64, **config)
    try:
        return llm.generate([f"record {i}: " for i in range(len(params))], params, use_tqdm=False), llm
    finally:
        llm.exit()
        gc.collect()
        torch.cuda.empty_cache()


def test_constrained_generation_on_cuda(path):
    constraints = [dict(json=SCHEMA), dict(regex=REGEX), dict(choice=["yes", "no"])] * 8
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=48, structured_outputs=c)
              for i, c in enumerate(constraints)]
    outs, llm = run(path, params)
    for out, constraint in zip(outs, constraints):
        assert all(t < TOKENIZER_VOCAB for t in out["token_ids"])
        assert_valid(llm, constraint, out)
    assert sum(o["finish_reason"] == "stop" for o in outs) >= len(outs) // 2
    no_overlap, _ = run(path, params, enable_overlap=False)
    assert [o["token_ids"] for o in no_overlap] == [o["token_ids"] for o in outs]
