"""Shared fixtures: tiny random HF checkpoints (the oracle is HF transformers itself)."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter; must be set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402

from nanovllm.utils.random_checkpoint import make_random_checkpoint  # noqa: E402


def _patch_the_interpreter_once_per_launch() -> None:
    """Triton's CPU interpreter re-patches triton.language (inspect.getmembers over the
    module, its tensor class and math) on every call of a @triton.jit helper, in every program
    of the grid: ~40 % of the kernel tests' time, for patches the launch has already made.
    Here a helper call inside a launch skips that when the language modules it sees were
    patched earlier in the same launch; the launch's own patch and its restore are unchanged,
    and the helpers run the same interpreted code, so every kernel computes the same bits."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if patch_lang is None or launch is None or list(inspect.signature(patch_lang).parameters) != ["fn"]:
        return  # another Triton: leave its interpreter alone
    if getattr(patch_lang, "once_per_launch", False):
        return  # installed already
    launches = []  # per running launch: ids of the language modules patched so far (None before its own)

    class Patched:
        def restore(self) -> None:
            pass  # a helper's patch is never restored by Triton either

    def langs_of(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}  # as Triton finds them

    def once_per_launch(fn):
        if launches and launches[-1] is not None:  # a helper called inside a running kernel
            langs = langs_of(fn)
            if langs and langs <= launches[-1]:
                return Patched()
        scope = patch_lang(fn)  # outside a kernel, the launch's own patch, or a helper's first
        if launches:
            launches[-1] = (launches[-1] or set()) | langs_of(fn)
        return scope

    def counted_launch(self, *args, **kwargs):
        launches.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    once_per_launch.once_per_launch = True
    interpreter._patch_lang = once_per_launch
    interpreter.GridExecutor.__call__ = counted_launch


_patch_the_interpreter_once_per_launch()

# The property tests run few enough examples for the suite to take minutes on 2 cores;
# NANOVLLM_FUZZ_SCALE=10 searches ten times deeper (a slower run before a release).
FUZZ_SCALE = float(os.environ.get("NANOVLLM_FUZZ_SCALE", "1"))


def fuzz_examples(n: int) -> int:
    return max(1, round(n * FUZZ_SCALE))

VOCAB = 512
BASE = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
            eos_token_id=1, bos_token_id=2)
VARIANTS = {
    "qwen3": {},
    "qwen3-tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=256)),
    "llama-untied-bias": dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True,
                              mlp_bias=True),
    "qwen3-moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    # layers 0 and 2 dense by decoder_sparse_step, layer 3 by mlp_only_layers: only layer 1 is sparse
    "qwen3-moe-dense-layers": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8,
                                   num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                                   num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen2-moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
}


def variant_config(name: str) -> dict:
    return {**BASE, **VARIANTS[name]}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> path of a saved random checkpoint of that variant (made once)."""
    made = {}

    def get(name: str = "qwen3") -> str:
        if name not in made:
            path = str(tmp_path_factory.mktemp(name))
            # initializer_range 0.5: at HF's default 0.02 a random model repeats one token
            made[name] = make_random_checkpoint(path, variant_config(name), seed=0, init_range=0.5)
        return made[name]
    return get


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
