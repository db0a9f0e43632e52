"""Qwen3-MoE with tensor parallelism on CPU (gloo): every rank holds each expert's slice of
the intermediate dimension and the layer all-reduces once; TP=2 must equal TP=1 and HF."""
from nanovllm import LLM, SamplingParams
from tests.conftest import VOCAB
from tests.helpers import assert_greedy_matches_hf, needs_two_ranks, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@needs_two_ranks
def test_moe_tp2_matches_tp1_and_hf(checkpoint):
    path = checkpoint("qwen3-moe")
    prompts = random_prompts([1, 7, 40, 257, 30], VOCAB, seed=9)
    config = dict(kvcache_block_size=16, max_model_len=512, max_num_batched_tokens=64, num_kvcache_blocks=32)
    tp1 = LLM(path, **config)
    expected = [o["token_ids"] for o in tp1.generate(prompts, GREEDY, use_tqdm=False)]
    tp1.exit()
    tp2 = LLM(path, tensor_parallel_size=2, **config)
    try:
        experts = tp2.model_runner.model.model.layers[0].mlp.experts
        assert experts.gate_up_proj.shape == (8, 2 * 16, 64), "each rank holds half of every expert"
        got = [o["token_ids"] for o in tp2.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        tp2.exit()
    assert got == expected
    for prompt, tokens in zip(prompts, got):
        assert_greedy_matches_hf(path, prompt, tokens)
