"""Stream a safetensors checkpoint into a model's parameters, shard by shard."""
import glob
import json
import os
import zlib

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

# checkpoint keys that carry no parameter of ours
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# load_format "dummy": weights uniform in +-this (vLLM's choice): small enough that bf16 activations stay finite
DUMMY_INIT_RANGE = 1e-3
# the checkpoint dtypes a weight may come in (cast to the model's dtype as it loads)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_shape(loaded: torch.Tensor, expected) -> None:
    """The checkpoint tensor must have the model's full (unsharded) shape: checked before a
    loader narrows it to this rank's slice, which would hide a mismatch or fail without a name."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape mismatch: parameter {tuple(expected)} vs checkpoint {tuple(loaded.shape)}")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    check_shape(loaded, param.shape)
    param.data.copy_(loaded)


def _route(name: str, packed: dict) -> tuple[str, object]:
    """Map a checkpoint key to (our parameter name, shard id or None), matching packed
    module names on whole dotted components (never substrings)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            target, shard_id = packed[part]
            return ".".join(parts[:i] + [target] + parts[i + 1:]), shard_id
    return name, None


def _open_checked(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read checkpoint file {file!r} ({' '.join(str(e).split())}); is it truncated "
                         f"or corrupt?") from e


def _read_tensor(f, file: str, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read tensor {key!r} from checkpoint file {file!r} "
                         f"({' '.join(str(e).split())}); is it truncated or corrupt?") from e


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place, on its device, uniformly in +-DUMMY_INIT_RANGE. Each
    parameter's generator is seeded by its name, so every rank and every run draws the same."""
    for name, param in model.named_parameters():
        generator = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
        param.uniform_(-DUMMY_INIT_RANGE, DUMMY_INIT_RANGE, generator=generator)


def _check_index(path: str) -> None:
    """Shards named by model.safetensors.index.json must all be present: a missing one would
    otherwise show only as missing weights, after every other shard has loaded."""
    index = os.path.join(path, "model.safetensors.index.json")
    try:
        with open(index, encoding="utf-8") as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no index, or one we cannot read: the loader's own checks still name what is missing
    missing = sorted(s for s in shards if not os.path.isfile(os.path.join(path, str(s))))
    if missing:
        raise FileNotFoundError(f"checkpoint shard(s) {missing[:5]} named by {index} are missing")


@torch.no_grad()
def load_model(model: nn.Module, path: str, load_format: str = "auto") -> None:
    """Load every `*.safetensors` tensor under `path` through its parameter's
    `weight_loader`; raise if a parameter (or fused shard) is missing, loaded twice, or a
    checkpoint key has no parameter. load_format "dummy" reads no file: random weights."""
    if load_format == "dummy":
        init_dummy_weights(model)
        return
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model directory {path!r}")
    _check_index(path)
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    # a model may claim keys its packed mapping cannot express (experts stacked into one tensor)
    route_special = getattr(model, "route_checkpoint_key", lambda key: None)
    expected = {(n, s) for n, p in params.items() for s in getattr(p, "shard_ids", [None])}
    loaded, unexpected = set(), []
    for file in files:
        with _open_checked(file) as f:
            for key in f.keys():
                if key.endswith(IGNORED_SUFFIXES) or (key == "lm_head.weight" and model.tie_word_embeddings):
                    continue
                name, shard_id = route_special(key) or _route(key, packed)
                if (name, shard_id) not in expected:  # no such parameter, or e.g. an expert id past num_experts
                    unexpected.append(key)
                    continue
                if (name, shard_id) in loaded:
                    raise ValueError(f"checkpoint tensor {key!r} loaded twice")
                param = params[name]
                tensor = _read_tensor(f, file, key)
                if tensor.dtype not in WEIGHT_DTYPES:  # a cast would load integers or quantized codes as values
                    raise ValueError(f"checkpoint tensor {key!r} has dtype {tensor.dtype}; weights must be one of "
                                     f"{[str(d) for d in WEIGHT_DTYPES]} (quantized checkpoints are not supported)")
                try:
                    weight_loader = getattr(param, "weight_loader", default_weight_loader)
                    if shard_id is None:
                        weight_loader(param, tensor)
                    else:
                        weight_loader(param, tensor, shard_id)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {key!r}: {e}") from e
                loaded.add((name, shard_id))
    missing = sorted(f"{n}" + (f"[{s}]" if s is not None else "") for n, s in expected - loaded)
    if unexpected or missing:
        raise ValueError(f"checkpoint {path!r} does not match the model: "
                         f"missing weights {missing[:10]}, unexpected weights {unexpected[:10]}")

