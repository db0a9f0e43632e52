"""Model registry, keyed by the checkpoint's `config.architectures[0]`."""
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.models.qwen3_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

# Qwen2 and Llama are Qwen3 without q/k norm (Qwen2: biased qkv; Llama: llama3 RoPE scaling,
# optional attention/MLP biases); ModelConfig.from_hf sets those flags.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen3ForCausalLM,
    "LlamaForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
}


def build_model(cfg: ModelConfig, max_position: int) -> nn.Module:
    if cfg.architecture not in MODEL_REGISTRY:
        raise ValueError(f"model architecture {cfg.architecture!r} (config.json 'architectures') is not "
                         f"supported; supported architectures: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[cfg.architecture](cfg, max_position)
