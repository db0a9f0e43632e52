"""GGUF checkpoints: converted once into a cached HF directory the engine loads like any other.

HF transformers reads the GGUF (dequantizing Q4/Q8 blocks to float32) and writes safetensors,
config.json, generation_config.json and the tokenizer (with its chat template) into the cache
folder (`nanovllm.utils.cache`). The cache key is the file's content identity, cheap to
compute: its size and a sha256 over its first and last MiB and evenly spaced samples between,
so a second start costs milliseconds, not a pass over the whole file, and a copy of the file
elsewhere hits the same conversion. A cached conversion whose files no longer match its
manifest (a truncated copy, an interrupted write) is converted again.
"""
import hashlib
import logging
import os
import shutil
import time

from nanovllm.utils.cache import cache_dir, is_intact, seal

logger = logging.getLogger("nanovllm")

HASH_CHUNK = 1 << 20   # bytes hashed at each end of the file
NUM_SAMPLES = 16       # evenly spaced samples of SAMPLE_BYTES between the ends
SAMPLE_BYTES = 1 << 16
KEY_LEN = 16           # hex digits of the sha256 that name a cache directory
# Tokens that end a chat turn in common templates. A GGUF carries one EOS id; a chat model
# that ends its turn with another one (SmolLM2: <|im_end|>) must stop there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
GGUF_PIP = "pip install 'nanovllm[demo]'  (or: pip install gguf accelerate)"


def gguf_cache_key(path: str) -> str:
    """sha256 over the size, the first and last MiB and NUM_SAMPLES samples between them:
    the same bytes anywhere give the same key (never the path or the mtime)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}:".encode())
    offsets = [0, max(0, size - HASH_CHUNK)] + [size * (i + 1) // (NUM_SAMPLES + 1) for i in range(NUM_SAMPLES)]
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(HASH_CHUNK if offset in offsets[:2] else SAMPLE_BYTES))
    return h.hexdigest()[:KEY_LEN]


def gguf_to_hf_dir(path: str) -> str:
    """The HF directory converted from the GGUF file at `path`, converting it on first use.

    NOTE: the directory appears by an atomic rename of a finished temporary one, so its
    existence means the conversion completed (two processes racing both convert; one wins)."""
    path = os.path.abspath(path)
    out_dir = cache_dir("gguf", gguf_cache_key(path))
    if is_intact(out_dir):
        logger.info("GGUF %s: using the converted checkpoint in %s", path, out_dir)
        return out_dir
    if os.path.exists(out_dir):
        logger.warning("GGUF %s: the cached conversion in %s is incomplete or damaged; converting again", path, out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        try:
            convert_gguf(path, tmp_dir)
        except ImportError:
            raise
        except Exception as e:  # the reader fails in many ways on a bad file (numpy reshape, struct, KeyError)
            raise ValueError(f"cannot convert GGUF file {path!r} ({type(e).__name__}: {' '.join(str(e).split())}); "
                             f"is it truncated or corrupt?") from e
        seal(tmp_dir, {"gguf_file": path, "size": os.path.getsize(path)})
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:  # another process finished first
            if not is_intact(out_dir):
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
