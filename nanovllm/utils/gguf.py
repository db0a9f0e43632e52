"""GGUF checkpoints: converted once into a cached HF directory the engine loads like any other.

HF transformers reads the GGUF (dequantizing Q4/Q8 blocks to float32) and writes safetensors,
config.json, generation_config.json and the tokenizer (with its chat template). The cache key
is cheap to compute: file size + mtime + sha256 of the first and last MiB, so a second start
costs a few milliseconds, not a pass over the whole file.
"""
import hashlib
import json
import logging
import os
import shutil
import time

logger = logging.getLogger("nanovllm")

CACHE_ENV = "NANOVLLM_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "nanovllm")
HASH_CHUNK = 1 << 20   # bytes hashed at each end of the file
KEY_LEN = 16           # hex digits of the sha256 that name a cache directory
# Tokens that end a chat turn in common templates. A GGUF carries one EOS id; a chat model
# that ends its turn with another one (SmolLM2: <|im_end|>) must stop there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
GGUF_PIP = "pip install 'nanovllm[demo]'  (or: pip install gguf accelerate)"


def cache_root() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def gguf_cache_key(path: str) -> str:
    """sha256 over (size, mtime_ns, first MiB, last MiB); any rewrite of the file changes it."""
    st = os.stat(path)
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(HASH_CHUNK))
        f.seek(max(0, st.st_size - HASH_CHUNK))
        h.update(f.read(HASH_CHUNK))
    return h.hexdigest()[:KEY_LEN]


def gguf_to_hf_dir(path: str) -> str:
    """The HF directory converted from the GGUF file at `path`, converting it on first use.

    NOTE: the directory appears by an atomic rename of a finished temporary one, so its
    existence means the conversion completed (two processes racing both convert; one wins)."""
    path = os.path.abspath(path)
    out_dir = os.path.join(cache_root(), "gguf", gguf_cache_key(path))
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        logger.info("GGUF %s: using the converted checkpoint in %s", path, out_dir)
        return out_dir
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        convert_gguf(path, tmp_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("GGUF %s: converted to %s in %.1f s (cached for the next start)", path, out_dir,
                time.perf_counter() - start)
    return out_dir


def convert_gguf(path: str, out_dir: str) -> None:
    """Write the HF checkpoint for the GGUF file `path` into `out_dir` (float32 safetensors)."""
    AutoModelForCausalLM, AutoTokenizer = _transformers_with_gguf()
    import torch
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _clear_quantization_markers(model)
    eos = eos_token_ids(tokenizer, model.config.eos_token_id)
    if eos:
        model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # + generation_config.json
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "nanovllm_source.json"), "w") as f:
        json.dump({"gguf_file": path, "size": os.path.getsize(path)}, f, indent=2)


def eos_token_ids(tokenizer, config_eos) -> list[int]:
    """The config's and tokenizer's EOS ids plus the end-of-turn tokens its chat template uses."""
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    ids.append(tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    ids += [vocab[tok] for tok in END_OF_TURN_TOKENS if tok in template and tok in vocab]
    return sorted({i for i in ids if isinstance(i, int)})


def _clear_quantization_markers(model) -> None:
    """A GGUF-loaded model is flagged quantized (`hf_quantizer`, `config.quantization_config`,
    `quantization_method`, `is_quantized`) and `save_pretrained` refuses it ("not
    serializable"), although its weights are already dequantized floats. Clearing the flags
    saves plain safetensors, and a config.json without a quantization_config."""
    for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"),
                      (model, "quantization_method"), (model, "_weight_conversions")):
        if hasattr(obj, attr):
            delattr(obj, attr)
    model.is_quantized = False


def _transformers_with_gguf():
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
        import accelerate  # noqa: F401  (transformers requires it to load a GGUF)
    except ImportError as e:
        raise ImportError(f"loading a GGUF checkpoint needs the gguf and accelerate packages: {GGUF_PIP}") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM, AutoTokenizer
