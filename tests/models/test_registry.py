"""Checkpoints we cannot run fail at load time with a message that says why."""
import json
import os
import shutil

import pytest

from nanovllm import LLM
from nanovllm.models import MODEL_REGISTRY


def edited_checkpoint(src: str, dst, **changes) -> str:
    """A copy of checkpoint `src` whose config.json has `changes` applied (None deletes a key)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)
    return str(dst)


def test_unsupported_architecture_lists_the_supported_ones(checkpoint, tmp_path):
    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", architectures=["MistralForCausalLM"],
                             model_type="mistral")
    with pytest.raises(ValueError, match="'MistralForCausalLM'.* not supported") as e:
        LLM(path, num_kvcache_blocks=8)
    for arch in MODEL_REGISTRY:
        assert arch in str(e.value)


def test_unsupported_activation(checkpoint, tmp_path):
    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        LLM(path, num_kvcache_blocks=8)


def test_unsupported_rope_scaling(checkpoint, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}
    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", rope_scaling=None, rope_parameters=yarn)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        LLM(path, num_kvcache_blocks=8)
