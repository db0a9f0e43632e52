"""nanovllm's one cache folder: `$NANOVLLM_CACHE_DIR`, else `~/.cache/nanovllm`.

What it holds (delete any entry, or the folder, to reclaim the space; it is rebuilt on
the next use):
- `gguf/<key>/`: a GGUF checkpoint converted to float32 safetensors + its tokenizer, keyed
  by the file's content, not its path (a copy in another virtualenv reuses it). About 5x
  the .gguf for 4-bit files: the demo's 98 MB GGUF becomes ~520 MB.
- `<model>-random-<key>/`: bench.py's random-weight bf16 checkpoints (Qwen3-0.6B: ~1.2 GB),
  made only when it runs without `--model`.

Every cached folder carries a manifest of its files' sizes, written last: a folder whose
manifest is missing or does not match (an interrupted copy, a truncated file) is rebuilt.
"""
import json
import os

CACHE_DIR_ENV = "NANOVLLM_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "nanovllm")
MANIFEST = "nanovllm_manifest.json"


def cache_dir(*parts: str) -> str:
    """A path inside the cache folder (not created)."""
    return os.path.join(os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR), *parts)


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    sizes.pop(MANIFEST, None)
    return sizes


def seal(folder: str, source: dict) -> None:
    """Record every file's size (and where the folder came from) once it is complete."""
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"source": source, "files": _file_sizes(folder)}, f, indent=2)


def is_intact(folder: str) -> bool:
    """The folder was sealed and every file it listed is still there, at its size."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
        return all(os.path.getsize(os.path.join(folder, name)) == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
