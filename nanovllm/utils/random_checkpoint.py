"""Random-weight HF checkpoints: for tests (the HF model is the oracle) and for benchmarks
(speed does not depend on the weights). No model hub needed.
"""
import json
import os

import torch

# The real Qwen3-0.6B config.json (weights aside): the benchmark and GPU-test model.
QWEN3_0_6B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary covers every model token id.

    Token i is the word `t{i}` (specials first), so any sampled id detokenizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<bos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")


def make_random_checkpoint(path: str, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                           init_range: float | None = None, with_tokenizer: bool = True) -> str:
    """Build an HF causal LM from `config` (a config.json dict, `architectures` set), with
    random weights, and save it as safetensors (+ a tokenizer) under `path`.

    `init_range` overrides `initializer_range`: tests use a large one (e.g. 0.5) because at
    the default 0.02 a random model repeats one token, which hides position and cache bugs."""
    import transformers

    config = dict(config)
    if init_range is not None:
        config["initializer_range"] = init_range
    arch = config["architectures"][0]
    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hf_config).to(dtype)
    with torch.no_grad():  # HF zeroes biases at init: random ones make loading them testable
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, hf_config.initializer_range)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        make_tokenizer(config["vocab_size"]).save_pretrained(path)
    return path


def load_config(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
