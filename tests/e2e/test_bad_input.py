"""Bad input is rejected at the edge with a clear error, before any request runs, and the
engine stays usable: after each rejected `generate` the same LLM still produces exactly
what a fresh engine does, with every KV block free."""
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from tests.conftest import VOCAB
from tests.helpers import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# 8 blocks of 16 = 128 KV tokens; max_model_len 256 leaves room for the cache check to fire
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=256)
GOOD = random_prompts([5, 20, 40], VOCAB, seed=7)


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    """One engine that every bad call below is thrown at."""
    return LLM(checkpoint("qwen3"), **ENGINE)


@pytest.fixture(scope="module")
def reference(checkpoint) -> list[list[int]]:
    """GOOD's greedy completions from a fresh engine that never saw bad input."""
    outs = LLM(checkpoint("qwen3"), **ENGINE).generate(GOOD, GREEDY, use_tqdm=False)
    return [out["token_ids"] for out in outs]


def assert_rejected_before_running(llm: LLM, monkeypatch, call, exc, match: str) -> None:
    """`call(llm)` raises `exc` (message matching `match`) without queueing a request,
    taking a block or running a step."""
    bm = llm.block_manager
    free_before, cached_before = list(bm.free_block_ids), dict(bm.hash_to_block)
    steps = []
    real_step = llm.step
    monkeypatch.setattr(llm, "step", lambda: steps.append(1) or real_step())
    with pytest.raises(exc, match=match):
        call(llm)
    monkeypatch.undo()
    assert steps == [], "a step ran before the bad input was rejected"
    assert not llm.scheduler.waiting and not llm.scheduler.running
    # untouched, not merely freed again: the free list keeps its order, the cache its entries
    assert list(bm.free_block_ids) == free_before and bm.hash_to_block == cached_before
    bm.check_integrity([])


def assert_still_generates(llm: LLM, reference: list[list[int]]) -> None:
    outs = llm.generate(GOOD, GREEDY, use_tqdm=False)
    assert [out["token_ids"] for out in outs] == reference
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    llm.block_manager.check_integrity([])


# ---- bad generate calls -------------------------------------------------------------------

BAD_GENERATE = {
    # id: (prompts, sampling_params, exception, message pattern)
    "empty token list": ([GOOD[0], []], GREEDY, ValueError, r"prompts\[1\] is empty"),
    "empty string": ([""], GREEDY, ValueError, r"prompts\[0\] is empty"),
    "negative token id": ([GOOD[0], [5, -1, 6]], GREEDY, ValueError, r"prompts\[1\].*-1"),
    "token id == vocab": ([[5, VOCAB]], GREEDY, ValueError, rf"prompts\[0\].*{VOCAB}"),
    "huge token id": ([GOOD[1], [2**40]], GREEDY, ValueError, rf"prompts\[1\].*{2**40}"),
    "float token id": ([[5, 6.0]], GREEDY, TypeError, r"prompts\[0\]"),
    "str token id": ([[5, "6"]], GREEDY, TypeError, r"prompts\[0\]"),
    "bool token id": ([GOOD[0], [5, True]], GREEDY, TypeError, r"prompts\[1\]"),
    "None prompt": ([GOOD[0], None], GREEDY, TypeError, r"prompts\[1\]"),
    "int prompt in a batch": ([GOOD[0], 5], GREEDY, TypeError, r"prompts\[1\]"),
    "prompt + max_tokens > max_model_len": ([GOOD[0], [5] * 250], SamplingParams(temperature=0, max_tokens=7),
                                            ValueError, r"prompts\[1\].*257.*max_model_len 256"),
    "more KV blocks than the cache": ([[5] * 125], GREEDY, ValueError, r"prompts\[0\].*133 tokens need 9 KV blocks"
                                                                       r".*whole cache has 8"),
    "fewer params than prompts": (GOOD, [GREEDY, GREEDY], ValueError, r"3 prompts but 2 sampling params"),
    "more params than prompts": (GOOD[:1], [GREEDY, GREEDY], ValueError, r"1 prompts but 2 sampling params"),
    "params list holds a dict": (GOOD[:2], [GREEDY, {"temperature": 0}], TypeError, r"sampling_params\[1\]"),
    "params is a dict": (GOOD[:1], {"temperature": 0}, TypeError, r"sampling_params"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_is_rejected_and_engine_stays_usable(llm, reference, monkeypatch, case):
    prompts, params, exc, match = BAD_GENERATE[case]
    assert_rejected_before_running(llm, monkeypatch, lambda e: e.generate(prompts, params, use_tqdm=False),
                                   exc, match)
    assert_still_generates(llm, reference)


@pytest.mark.parametrize("params,exc,match", [
    ("greedy", TypeError, "sampling_params"),     # today: split into 6 characters, "1 prompts but 6"
    (0, TypeError, "sampling_params"),            # today: runs with the defaults
    (1.5, TypeError, "sampling_params"),          # today: "'float' object is not iterable"
    ([], ValueError, "1 prompts but 0 sampling params"),  # today: runs with the defaults
], ids=["str", "zero", "float", "empty list"])
def test_sampling_params_of_the_wrong_type(llm, reference, monkeypatch, params, exc, match):
    assert_rejected_before_running(llm, monkeypatch, lambda e: e.generate(GOOD[:1], params, use_tqdm=False),
                                   exc, match)
    assert_still_generates(llm, reference)


@pytest.mark.parametrize("prompts", [None, 5, 1.5], ids=repr)
def test_prompts_of_the_wrong_type(llm, reference, monkeypatch, prompts):
    assert_rejected_before_running(llm, monkeypatch, lambda e: e.generate(prompts, GREEDY, use_tqdm=False),
                                   TypeError, "prompts")
    assert_still_generates(llm, reference)


def test_good_prompts_before_a_bad_one_do_not_run(llm, reference, monkeypatch):
    batch = GOOD + [[5, VOCAB + 1]]
    assert_rejected_before_running(llm, monkeypatch, lambda e: e.generate(batch, GREEDY, use_tqdm=False),
                                   ValueError, r"prompts\[3\]")
    assert_still_generates(llm, reference)


def test_numpy_integers_and_tuples_are_token_ids(llm, reference):
    for prompts in ([[np.int64(t) for t in p] for p in GOOD], [tuple(p) for p in GOOD]):
        assert [out["token_ids"] for out in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    lone = llm.generate(tuple(GOOD[0]), GREEDY, use_tqdm=False)  # one prompt, as a list would be
    assert [out["token_ids"] for out in lone] == reference[:1]
    numpy_params = SamplingParams(temperature=np.float32(0), max_tokens=np.int64(8), ignore_eos=True)
    assert [out["token_ids"] for out in llm.generate(GOOD, numpy_params, use_tqdm=False)] == reference


def test_the_largest_request_that_fits_runs(llm):
    """The edge of the cache check: 120 + 8 tokens fill all 8 blocks exactly."""
    out = llm.generate([[5] * 120], GREEDY, use_tqdm=False)[0]
    assert len(out["token_ids"]) == 8 and out["finish_reason"] == "length"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


# ---- bad SamplingParams -------------------------------------------------------------------

BAD_PARAMS = [
    ("temperature", -0.5), ("temperature", -1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "0.5"), ("temperature", None), ("temperature", True),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("max_tokens", "8"), ("max_tokens", None),
    ("max_tokens", True),
    ("ignore_eos", "yes"), ("ignore_eos", 1), ("ignore_eos", None),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_bad_sampling_params(field, value):
    with pytest.raises((ValueError, TypeError)) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value) and repr(value) in str(info.value), str(info.value)


def test_unknown_sampling_params_keyword():
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=0)


# ---- bad Config ---------------------------------------------------------------------------

BAD_CONFIG = [
    ("max_num_batched_tokens", 0), ("max_num_batched_tokens", -1), ("max_num_batched_tokens", 1.5),
    ("max_num_batched_tokens", True), ("max_num_seqs", 0), ("max_num_seqs", "8"), ("max_model_len", 0),
    ("max_model_len", None), ("tensor_parallel_size", 0), ("gpu_memory_utilization", 0),
    ("gpu_memory_utilization", 1.5), ("gpu_memory_utilization", -0.1), ("gpu_memory_utilization", math.nan),
    ("gpu_memory_utilization", "0.9"), ("gpu_memory_utilization", True), ("kvcache_block_size", 8), ("kvcache_block_size", 24),
    ("kvcache_block_size", 48), ("kvcache_block_size", 0), ("kvcache_block_size", 16.0),
    ("num_kvcache_blocks", 0), ("num_kvcache_blocks", -2), ("cpu_kvcache_bytes", 0),
    ("enforce_eager", "no"), ("enable_prefix_caching", 1), ("device", "tpu"), ("dtype", "fp8"),
    ("attention_backend", "xla"), ("seed", 1.5), ("seed", "0"), ("kv_cache_dtype", "int4"),
    ("kv_cache_dtype", "float16"), ("kv_cache_dtype", None), ("max_model_len", 1), ("step_timeout_s", 0),
    ("step_timeout_s", -1.0), ("step_timeout_s", math.nan), ("step_timeout_s", True), ("step_timeout_s", "60"),
]


@pytest.mark.parametrize("field,value", BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_bad_config_value(checkpoint, field, value):
    with pytest.raises(ValueError) as info:
        LLM(checkpoint("qwen3"), **{field: value})
    assert field in str(info.value) and repr(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("field", ["kvcache_block_size", "num_kvcache_blocks", "cpu_kvcache_bytes"])
def test_a_huge_config_value_is_cut_to_one_readable_line(checkpoint, field):
    with pytest.raises(ValueError) as info:
        LLM(checkpoint("qwen3"), **{field: 10**400})
    message = str(info.value)
    assert message.startswith(f"{field} must be") and len(message) < 300 and "\n" not in message


@pytest.mark.parametrize("bs", [16, 32, 64, 256])
def test_power_of_two_block_sizes_are_accepted(checkpoint, bs):
    llm = LLM(checkpoint("qwen3"), kvcache_block_size=bs, num_kvcache_blocks=4, max_model_len=256)
    assert llm.engine_info()["kvcache_block_size"] == bs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda(checkpoint):
    with pytest.raises(ValueError, match=r"device.*'cuda'"):
        LLM(checkpoint("qwen3"), device="cuda")


def test_unknown_config_keyword_lists_valid_ones(checkpoint):
    with pytest.raises(TypeError) as info:
        LLM(checkpoint("qwen3"), max_num_seq=4)
    message = str(info.value)
    assert "max_num_seq'" in message
    for valid in ("max_num_seqs", "max_num_batched_tokens", "kvcache_block_size", "enable_prefix_caching"):
        assert valid in message


# ---- bad model directories ----------------------------------------------------------------

@pytest.fixture
def model_copy(checkpoint, tmp_path) -> str:
    """A private copy of the tiny checkpoint to break."""
    return shutil.copytree(checkpoint("qwen3"), tmp_path / "model")


def _weights_file(path) -> str:
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(files) == 1
    return os.path.join(path, files[0])


def _rewrite_weights(path, edit) -> None:
    file = _weights_file(path)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_model_dir(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        LLM(missing)


def test_model_dir_without_config_json(model_copy):
    os.remove(os.path.join(model_copy, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(model_copy))


def test_model_dir_without_safetensors(model_copy):
    os.remove(_weights_file(model_copy))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(model_copy))


def test_checkpoint_missing_a_weight(model_copy):
    _rewrite_weights(model_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(str(model_copy))


def test_checkpoint_with_an_unexpected_weight(model_copy):
    _rewrite_weights(model_copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"unexpected weights.*model\.layers\.0\.mlp\.extra\.weight"):
        LLM(str(model_copy))


def _bad_shape_case(key: str, shape: tuple[int, ...]):
    return pytest.param(key, shape, id=f"{key.split('model.')[-1]}{list(shape)}")


@pytest.mark.parametrize("key,shape", [
    _bad_shape_case("model.norm.weight", (65,)),
    _bad_shape_case("model.layers.0.input_layernorm.weight", (32,)),
    _bad_shape_case("model.layers.0.mlp.up_proj.weight", (128, 32)),      # a fused shard, wrong input dim
    _bad_shape_case("model.layers.0.self_attn.o_proj.weight", (32, 64)),  # row-parallel, wrong output dim
    _bad_shape_case("model.layers.0.mlp.down_proj.weight", (64, 64)),
    _bad_shape_case("model.layers.0.mlp.down_proj.weight", (64, 256)),
    _bad_shape_case("model.layers.0.self_attn.k_proj.weight", (48, 64)),
    _bad_shape_case("model.embed_tokens.weight", (VOCAB + 64, 64)),
    _bad_shape_case("lm_head.weight", (VOCAB - 1, 64)),
])
def test_checkpoint_with_a_shape_mismatched_weight(model_copy, key, shape):
    _rewrite_weights(model_copy, lambda t: t.update({key: torch.randn(shape)}))
    with pytest.raises(ValueError, match=re.escape(key)) as info:
        LLM(str(model_copy))
    assert str(shape) in str(info.value)  # the checkpoint's shape, next to the expected one
