"""ModelConfig.from_hf: one normalization of the HF config.json, whichever transformers
version (v4 top-level `rope_theta` / `rope_scaling`, v5 `rope_parameters`) wrote it."""
import json

import pytest
import torch
import transformers

from nanovllm.config import ModelConfig
from tests.conftest import variant_config

# trimmed config.json files as transformers v4 wrote them for real checkpoints
QWEN3_V4 = {  # Qwen3-0.6B
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960, "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936,
}
QWEN2_V4 = {  # Qwen2.5-0.5B: no head_dim, no attention_bias (Qwen2's q/k/v always have a bias)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "vocab_size": 151936,
}
LLAMA3_SCALING = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA_V4 = {  # Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "head_dim": 64,
    "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072, "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA3_SCALING,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def v5(config: dict) -> dict:
    """The same config in transformers v5's layout: rope settings in `rope_parameters`, `dtype`."""
    config = dict(config)
    scaling = config.pop("rope_scaling", None) or {"rope_type": "default"}
    config["rope_parameters"] = {**scaling, "rope_theta": config.pop("rope_theta")}
    config["dtype"] = config.pop("torch_dtype")
    return config


@pytest.mark.parametrize("layout", [dict, v5], ids=["v4", "v5"])
def test_qwen3(layout):
    cfg = ModelConfig.from_hf(layout(QWEN3_V4))
    assert (cfg.architecture, cfg.head_dim, cfg.num_key_value_heads) == ("Qwen3ForCausalLM", 128, 8)
    assert cfg.rope_theta == 1e6 and isinstance(cfg.rope_theta, float) and cfg.rope_scaling is None
    assert cfg.qk_norm and not cfg.attention_bias and cfg.tie_word_embeddings
    assert (cfg.torch_dtype, cfg.rms_norm_eps, cfg.max_position_embeddings) == ("bfloat16", 1e-6, 40960)


@pytest.mark.parametrize("layout", [dict, v5], ids=["v4", "v5"])
def test_qwen2_head_dim_fallback_and_bias_default(layout):
    cfg = ModelConfig.from_hf(layout(QWEN2_V4))
    assert cfg.head_dim == 896 // 14
    assert cfg.attention_bias and not cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None


def test_qwen2_always_has_qkv_bias_like_hf():
    # transformers' Qwen2Attention builds q/k/v with bias=True regardless of the config
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
    hf_config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=False)
    assert Qwen2Attention(hf_config, layer_idx=0).q_proj.bias is not None
    assert ModelConfig.from_hf({**QWEN2_V4, "attention_bias": False}).attention_bias


@pytest.mark.parametrize("layout", [dict, v5], ids=["v4", "v5"])
def test_llama3_rope_scaling(layout):
    cfg = ModelConfig.from_hf(layout(LLAMA_V4))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None
    assert {k: cfg.rope_scaling[k] for k in LLAMA3_SCALING} == LLAMA3_SCALING
    assert not cfg.qk_norm and not cfg.attention_bias and cfg.head_dim == 64


def test_fallbacks_when_fields_are_missing_or_null():
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": None, "head_dim": None}
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.head_dim, cfg.num_key_value_heads) == (16, 4)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert not cfg.tie_word_embeddings and cfg.torch_dtype == "float32"


def test_torch_dtype_prefix_is_dropped():
    assert ModelConfig.from_hf({**QWEN3_V4, "torch_dtype": "torch.float16"}).torch_dtype == "float16"


@pytest.mark.parametrize("scaling", [{"rope_type": "default"}, {"type": "default"}], ids=["rope_type", "type"])
def test_default_rope_scaling_is_no_scaling(scaling):
    assert ModelConfig.from_hf({**QWEN3_V4, "rope_scaling": scaling}).rope_scaling is None


@pytest.mark.parametrize("variant,tied,bias,qk_norm,scaled", [
    ("qwen3", False, False, True, False),
    ("qwen3-tied-mha", True, False, True, False),
    ("qwen2", False, True, False, False),
    ("llama", True, False, False, True),
])
def test_configs_written_by_the_installed_transformers(variant, tied, bias, qk_norm, scaled):
    """What `save_pretrained` writes with whatever transformers is installed (v4 or v5)."""
    written = variant_config(variant)
    hf = json.loads(transformers.AutoConfig.for_model(**written).to_json_string(use_diff=True))
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.tie_word_embeddings, cfg.attention_bias, cfg.qk_norm) == (tied, bias, qk_norm)
    assert cfg.rope_theta == written["rope_theta"]
    assert cfg.head_dim == written["head_dim"] and cfg.num_key_value_heads == written["num_key_value_heads"]
    assert cfg.vocab_size == written["vocab_size"] and cfg.max_position_embeddings == 2048
    if scaled:
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    else:
        assert cfg.rope_scaling is None


def test_from_dir_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_dir(str(tmp_path))


@pytest.mark.parametrize("checkpoint_dtype,requested,device,expected", [
    ("bfloat16", "auto", "cpu", torch.float32),   # half precision on CPU runs in float32
    ("bfloat16", "auto", "cuda", torch.bfloat16),
    ("float16", "auto", "cuda", torch.float16),
    ("bfloat16", "float16", "cpu", torch.float16),  # an explicit request wins
    ("float32", "bfloat16", "cuda", torch.bfloat16),
])
def test_resolve_dtype(checkpoint_dtype, requested, device, expected):
    cfg = ModelConfig.from_hf({**QWEN3_V4, "torch_dtype": checkpoint_dtype})
    assert cfg.resolve_dtype(requested, torch.device(device)) == expected


MOE = {**QWEN3_V4, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128,
       "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True, "mlp_only_layers": []}


@pytest.mark.parametrize("base, field, value, allowed", [
    (QWEN3_V4, "num_key_value_heads", "8", "an integer >= 1"),
    (QWEN3_V4, "num_key_value_heads", 3, "a divisor of num_attention_heads=16"),
    (QWEN3_V4, "head_dim", -16, "an even integer >= 2"),
    (QWEN3_V4, "head_dim", 127, "an even integer >= 2"),
    (QWEN3_V4, "max_position_embeddings", "40960", "an integer >= 2"),
    (QWEN3_V4, "rms_norm_eps", -1.0, "a number >= 0"),
    (QWEN3_V4, "rope_theta", 0, "a number > 0"),
    (QWEN3_V4, "rope_theta", "abc", "a number > 0"),
    (QWEN3_V4, "rope_scaling", "linear", "an object or null"),
    (QWEN3_V4, "architectures", "Qwen3ForCausalLM", "a list of model class names"),
    (QWEN3_V4, "tie_word_embeddings", "false", "true or false"),
    (QWEN2_V4, "num_attention_heads", 1792, "a divisor of hidden_size=896"),  # no head_dim: derived from it
    (MOE, "num_experts", "128", "an integer >= 0"),
    (MOE, "mlp_only_layers", 1, "a list of layer ids"),
    (MOE, "shared_expert_intermediate_size", "48", "an integer >= 0"),
    (MOE, "norm_topk_prob", "false", "true or false"),
])
def test_bad_optional_field_is_a_one_line_error(base, field, value, allowed):
    """Each once crashed deep in model code (ZeroDivisionError, TypeError...) or loaded wrong."""
    with pytest.raises(ValueError, match=rf"^config.json {field} must be {allowed}.*, got {value!r}$"):
        ModelConfig.from_hf({**base, field: value})


def test_moe_without_its_intermediate_size():
    hf = {k: v for k, v in MOE.items() if k != "moe_intermediate_size"}
    with pytest.raises(ValueError, match="needs moe_intermediate_size"):
        ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(MOE).moe_intermediate_size == 768
