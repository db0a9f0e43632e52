"""Qwen3-MoE / Qwen2-MoE against HF transformers on tiny random checkpoints (float32, CPU),
the router's tie order, expert weight loading, and load_format='dummy'."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.config import ModelConfig
from nanovllm.layers.fused_moe import select_experts_reference as select_experts
from nanovllm.models import build_model
from nanovllm.utils.loader import DUMMY_INIT_RANGE, init_dummy_weights
from tests.conftest import VOCAB
from tests.helpers import assert_greedy_matches_hf, hf_logits, random_prompts
from tests.models.test_hf_agreement import check_greedy, engine_logits

MOE_VARIANTS = ["qwen3-moe", "qwen3-moe-dense-layers", "qwen2-moe"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_prefill_logits_match_hf(checkpoint, variant):
    path = checkpoint(variant)
    llm = LLM(path, kvcache_block_size=16, max_model_len=1024, num_kvcache_blocks=64)
    # NOTE: logits reach ~19; float32 summation order gives <= 1.1e-4 (qwen2-moe, no q/k-norm),
    # while one token routed to a wrong expert moves its logits by O(1)
    for prompt in random_prompts([1, 7, 300], VOCAB, seed=1):
        diff = (engine_logits(llm, prompt) - hf_logits(path, prompt)).abs().max().item()
        assert diff <= 2e-4, f"{variant}: max abs logit diff {diff} for prompt length {len(prompt)}"


def test_sparse_and_dense_layers_follow_the_config(checkpoint):
    llm = LLM(checkpoint("qwen3-moe-dense-layers"), kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=8)
    kinds = [type(layer.mlp).__name__ for layer in llm.model_runner.model.model.layers]
    assert kinds == ["Qwen3MLP", "Qwen3MoeSparseMoeBlock", "Qwen3MLP", "Qwen3MLP"]


def test_greedy_matches_hf_under_chunking_preemption_and_prefix_hits(checkpoint):
    path = checkpoint("qwen3-moe")
    # chunked prefill (64-token budget) and preemption (24 blocks for 8 prompts) in one run
    prompts = random_prompts([1, 7, 40, 257, 30, 30, 30, 30], VOCAB, seed=7)
    llm = check_greedy(path, prompts, kvcache_block_size=16, max_num_batched_tokens=64, num_kvcache_blocks=24)
    assert llm.scheduler.num_preemptions > 0, "the tiny cache should force preemption"
    cached = []
    allocate = llm.block_manager.allocate
    llm.block_manager.allocate = lambda seq: (allocate(seq), cached.append(seq.num_cached_tokens))[0]
    repeat = [prompts[3], prompts[3][:100] + [5, 6, 7]]  # served (in part) from the prefix cache
    for prompt, out in zip(repeat, llm.generate(repeat, GREEDY, use_tqdm=False)):
        assert_greedy_matches_hf(path, prompt, out["token_ids"])
    assert max(cached) > 0, "the repeated prompts should hit the prefix cache"


@pytest.mark.parametrize("variant", ["qwen3-moe-dense-layers", "qwen2-moe"])
def test_greedy_matches_hf_variants(checkpoint, variant):
    check_greedy(checkpoint(variant), random_prompts([1, 7, 257], VOCAB), kvcache_block_size=16,
                 max_num_batched_tokens=64)


def test_router_ties_go_to_the_lowest_expert_id():
    logits = torch.tensor([[0.0] * 8,                                     # all tied
                           [1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0, 2.0],      # a tie across the top-k boundary
                           [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 5.0]])
    routing = select_experts(logits, top_k=4, renormalize=True)
    assert routing.ids.tolist() == [[0, 1, 2, 3], [1, 2, 4, 5], [5, 7, 0, 1]]
    assert routing.ids.dtype == torch.int32 and routing.weights.dtype == torch.float32
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(3))
    # against a brute force order (probability descending, then expert id) on random ties
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (64, 16), generator=gen).float()
    routing = select_experts(logits, top_k=5, renormalize=False)
    probs = torch.softmax(logits, -1)
    for row, ids in zip(probs.tolist(), routing.ids.tolist()):
        assert ids == sorted(range(16), key=lambda e: (-row[e], e))[:5]
    torch.testing.assert_close(routing.weights, probs.gather(1, routing.ids.long()))


def test_a_missing_expert_weight_is_named(checkpoint, tmp_path):
    src = checkpoint("qwen3-moe")
    dst = shutil.copytree(src, tmp_path / "m")
    weights = load_file(os.path.join(dst, "model.safetensors"))
    del weights["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \['model.layers.1.mlp.experts.gate_up_proj\[\(5, 1\)\]'\]"):
        LLM(str(dst), num_kvcache_blocks=8)


def test_dummy_weights_need_no_weight_files(checkpoint, tmp_path):
    src = checkpoint("qwen3-moe")
    dst = tmp_path / "m"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    outs = []
    for _ in range(2):
        llm = LLM(str(dst), load_format="dummy", kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=16)
        outs.append([o["token_ids"] for o in llm.generate(random_prompts([5, 40], VOCAB), GREEDY, use_tqdm=False)])
        assert all(len(t) == GREEDY.max_tokens and all(0 <= i < VOCAB for i in t) for t in outs[-1])
    assert outs[0] == outs[1], "dummy weights are seeded by parameter name: two runs must agree"
    with pytest.raises(ValueError, match="load_format must be one of \\['auto', 'dummy'\\], got 'npz'"):
        LLM(str(dst), load_format="npz")


def test_dummy_init_reaches_every_parameter(checkpoint):
    model = build_model(ModelConfig.from_dir(checkpoint("qwen2-moe")), 256)
    for param in model.parameters():
        param.data.fill_(float("nan"))
    init_dummy_weights(model)
    for name, param in model.named_parameters():
        assert param.abs().max().item() <= DUMMY_INIT_RANGE, name  # NaN fails this too
        assert param.std().item() > DUMMY_INIT_RANGE / 4, f"{name} is not random"
