"""User configuration (`Config`) and the normalized model description (`ModelConfig`)."""
import json
import os
from dataclasses import dataclass, fields

import torch

# NOTE: one meaning of "an int" / "a finite number", one form of the error
from nanovllm.sampling_params import _check, _is_int, _is_number

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: float8 e4m3 with per-token scales
LOAD_FORMATS = ("auto", "dummy")  # auto: the safetensors files; dummy: small random weights, no files read
MAX_STEP_TIMEOUT_S = 7 * 24 * 3600   # a week: beyond it the collectives' timedelta is meaningless
# config.json fields every supported architecture needs (the rest have defaults)
QWEN_MAX_WINDOW_LAYERS = 28   # transformers' Qwen2/Qwen3 default for max_window_layers
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class Config:
    """Engine settings; `LLM(model, **kwargs)` takes these fields as keyword arguments.

    Values the engine derives (KV cache size, EOS ids, graph sizes) are never written
    back here."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1          # -1: size the cache from memory
    cpu_kvcache_bytes: int = 1 << 30      # the KV budget on CPU, where no memory probe exists
    enable_prefix_caching: bool = True
    enable_overlap: bool = True           # schedule step N+1 while the device runs step N
    device: str | None = None             # None: cuda when available, else cpu
    dtype: str = "auto"                   # auto: the checkpoint's (float32 on CPU when it is half)
    attention_backend: str = "auto"       # auto: flash if importable on CUDA, else triton; torch on CPU
    kv_cache_dtype: str = "auto"          # auto: the model dtype; fp8: e4m3, half the bytes (triton/torch)
    seed: int = 0                         # seeds the shared sampling generator
    load_format: str = "auto"             # "dummy": random weights in place (benchmarks without weight files)
    step_timeout_s: float = 600.0         # tensor parallel: a step (or start-up collective) stuck longer fails

    def __post_init__(self):
        _check(isinstance(self.model, str) and len(self.model) > 0, "model", self.model, "a non-empty path")
        for name in ("max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        # NOTE: a request is at least one prompt token plus one generated token
        _check(_is_int(self.max_model_len) and self.max_model_len >= 2, "max_model_len", self.max_model_len,
               "an integer >= 2 (one prompt token + one generated token)")
        _check(_is_number(self.step_timeout_s) and 0 < self.step_timeout_s <= MAX_STEP_TIMEOUT_S,
               "step_timeout_s", self.step_timeout_s, f"a number of seconds in (0, {MAX_STEP_TIMEOUT_S}]")
        _check(_is_number(self.gpu_memory_utilization) and 0 < self.gpu_memory_utilization <= 1,
               "gpu_memory_utilization", self.gpu_memory_utilization, "in (0, 1]")
        bs = self.kvcache_block_size
        _check(_is_int(bs) and bs >= 16 and bs & (bs - 1) == 0, "kvcache_block_size", bs, "a power of two >= 16")
        # NOTE: sizes of memory: past int64 no tensor could hold them (and 10**400 overflows a float)
        blocks = self.num_kvcache_blocks
        _check(_is_int(blocks) and (blocks == -1 or 1 <= blocks < 2**63), "num_kvcache_blocks", blocks,
               "-1 (auto) or an integer in [1, 2**63)")
        _check(_is_int(self.cpu_kvcache_bytes) and 1 <= self.cpu_kvcache_bytes < 2**63,
               "cpu_kvcache_bytes", self.cpu_kvcache_bytes, "an integer in [1, 2**63)")
        for name in ("enforce_eager", "enable_prefix_caching", "enable_overlap"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        _check(self.device is None or self.device in ("cpu", "cuda") or str(self.device).startswith("cuda:"),
               "device", self.device, "None, 'cpu', 'cuda' or 'cuda:N'")
        _check(isinstance(self.dtype, str) and (self.dtype == "auto" or self.dtype in DTYPES), "dtype", self.dtype,
               f"'auto' or one of {list(DTYPES)}")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend", self.attention_backend,
               f"one of {list(ATTENTION_BACKENDS)}")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
               f"one of {list(KV_CACHE_DTYPES)}")
        if self.attention_backend == "flash" and self.kv_cache_dtype == "fp8":
            raise ValueError("attention_backend 'flash' cannot read an fp8 KV cache (kv_cache_dtype 'fp8'); "
                             "use attention_backend 'triton' or 'auto'")
        _check(self.load_format in LOAD_FORMATS, "load_format", self.load_format, f"one of {list(LOAD_FORMATS)}")
        # torch.Generator.manual_seed takes [-2**63, 2**64)
        _check(_is_int(self.seed) and -2**63 <= self.seed < 2**64, "seed", self.seed, "an integer in [-2**63, 2**64)")
        if self.device is not None and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but CUDA is not available; use device='cpu'")
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model directory not found: {self.model!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "Config":
        """Like `Config(model, **kwargs)`, but an unknown keyword is a TypeError listing the valid ones."""
        valid = [f.name for f in fields(cls) if f.name != "model"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown config keyword(s) {unknown}; valid ones are {valid}")
        return cls(model=model, **kwargs)

    @property
    def resolved_device(self) -> torch.device:
        name = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
            device = torch.device("cuda", 0)
        return device


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object (config.json, generation_config.json); a one-line
    ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = "is empty" if os.path.getsize(path) == 0 else f"is not valid JSON ({e})"
        raise ValueError(f"{path} {what}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


def read_hf_config(path: str) -> dict:
    """The model directory's config.json, as a dict; a one-line ValueError naming the file
    when it is not a JSON object or lacks a required field."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in model directory {path!r}")
    hf = read_json_object(config_path)
    for name in REQUIRED_HF_FIELDS:
        value = hf.get(name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{config_path}: {name!r} must be an integer >= 1, got "
                             f"{'nothing (missing)' if name not in hf else repr(value)}")
    return hf


def check_sliding_window(hf: dict, max_model_len: int) -> None:
    """Refuse a sliding-window model: our attention backends attend to the whole context.
    A window at least `max_model_len` long never slides, so it is accepted."""
    window = hf.get("sliding_window")
    if not _is_int(window) or window >= max_model_len:
        return
    layers, layer_types = hf.get("num_hidden_layers", 0), hf.get("layer_types")
    if isinstance(layer_types, list):  # transformers v5 writes each layer's kind
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        field = "layer_types"
    elif "use_sliding_window" in hf:  # Qwen2/Qwen3: layers from max_window_layers on slide
        first = hf.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS)
        sliding = list(range(first, layers)) if hf["use_sliding_window"] and _is_int(first) else []
        field = "use_sliding_window"
    else:  # Mistral-style: every layer slides
        sliding, field = list(range(layers)), "sliding_window"
    if sliding:
        raise ValueError(f"config.json: {field} makes layers {sliding[0]}..{sliding[-1]} attend to a sliding "
                         f"window of {window} tokens, which is not supported; pass max_model_len <= {window} "
                         f"(the window then never slides)")


def _check_hf_fields(hf: dict) -> None:
    """The optional config.json fields `ModelConfig.from_hf` reads (read_hf_config checks the
    required ones): a one-line error naming the field, not a crash deep in model code."""
    def optional(name: str, ok, allowed: str) -> None:
        if hf.get(name) is not None:
            _check(ok(hf[name]), f"config.json {name}", hf[name], allowed)

    def positive_int(x) -> bool:
        return _is_int(x) and x >= 1

    optional("architectures", lambda x: isinstance(x, list) and all(isinstance(a, str) for a in x),
             "a list of model class names")
    optional("num_key_value_heads", positive_int, "an integer >= 1")
    optional("head_dim", lambda x: _is_int(x) and x >= 2 and x % 2 == 0, "an even integer >= 2 (RoPE rotates pairs)")
    optional("max_position_embeddings", lambda x: _is_int(x) and x >= 2, "an integer >= 2")
    optional("rms_norm_eps", lambda x: _is_number(x) and x >= 0, "a number >= 0")
    optional("rope_theta", lambda x: _is_number(x) and x > 0, "a number > 0")
    optional("rope_scaling", lambda x: isinstance(x, dict), "an object or null")
    optional("rope_parameters", lambda x: isinstance(x, dict), "an object or null")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob"):
        optional(name, lambda x: isinstance(x, bool), "true or false")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    _check(heads % kv_heads == 0, "config.json num_key_value_heads", kv_heads,
           f"a divisor of num_attention_heads={heads} (each KV head serves a whole group of query heads)")
    if hf.get("head_dim") is None:  # derived as hidden_size // heads, as HF does
        _check(hf["hidden_size"] % heads == 0 and (hf["hidden_size"] // heads) % 2 == 0,
               "config.json num_attention_heads", heads,
               f"a divisor of hidden_size={hf['hidden_size']} leaving an even head_dim (or give head_dim)")
    for name in ("num_experts", "num_local_experts", "moe_intermediate_size", "shared_expert_intermediate_size"):
        optional(name, lambda x: _is_int(x) and x >= 0, "an integer >= 0")
    optional("mlp_only_layers", lambda x: isinstance(x, list) and all(_is_int(i) for i in x), "a list of layer ids")
    if (hf.get("num_experts") or hf.get("num_local_experts")) and not hf.get("moe_intermediate_size"):
        raise ValueError("config.json: a mixture-of-experts model (num_experts) needs moe_intermediate_size >= 1")


def _moe_fields(hf: dict) -> dict:
    """The mixture-of-experts fields of an HF config; {} for a dense model.

    NOTE: transformers v5 saves Qwen3-MoE's expert count as num_local_experts."""
    num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if not num_experts:
        return {}
    top_k = hf.get("num_experts_per_tok", 0)
    _check(_is_int(top_k) and 1 <= top_k <= num_experts, "config.json num_experts_per_tok", top_k,
           f"an integer in [1, num_experts={num_experts}]")
    step = hf.get("decoder_sparse_step", 1)
    _check(_is_int(step) and step >= 1, "config.json decoder_sparse_step", step, "an integer >= 1")
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()), decoder_sparse_step=step,
                shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0))


@dataclass(frozen=True)
class ModelConfig:
    """The HF config.json, normalized once so model code reads plain fields."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool      # biased q/k/v projections (Qwen2)
    o_proj_bias: bool         # biased o_proj (Llama/Qwen3 with attention_bias; never Qwen2)
    mlp_bias: bool            # biased gate/up/down projections (Llama with mlp_bias)
    qk_norm: bool             # per-head RMSNorm on q and k (Qwen3)
    torch_dtype: str
    # mixture of experts (Qwen3-MoE, Qwen2-MoE); num_experts 0: a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False              # renormalize the top-k routing weights to sum to 1
    mlp_only_layers: tuple[int, ...] = ()     # layers that keep a dense MLP
    decoder_sparse_step: int = 1              # every step-th layer (1-based) is sparse
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert; 0: none

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        _check_hf_fields(hf)
        arch = (hf.get("architectures") or ["?"])[0]
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (supported: 'silu')")
        heads = hf["num_attention_heads"]
        # transformers v5 moved rope_theta (and scaling) into rope_parameters
        rope_params = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None  # NOTE: "default" is plain RoPE in either layout
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # NOTE: HF's Qwen2 always biases q/k/v, whatever its config says
            attention_bias=(arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False))
                            or (arch == "Qwen2MoeForCausalLM" and bool(hf.get("qkv_bias", True)))),
            o_proj_bias=bool(hf.get("attention_bias", False)) and not arch.startswith("Qwen2"),
            mlp_bias=bool(hf.get("mlp_bias", False)) and arch == "LlamaForCausalLM",
            qk_norm=hf.get("model_type") in ("qwen3", "qwen3_moe") or arch.startswith("Qwen3"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", ""),
            **_moe_fields(hf),
        )

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        return cls.from_hf(read_hf_config(path))

    def is_sparse_layer(self, layer_id: int) -> bool:
        """Whether decoder layer `layer_id` (0-based) routes through experts (HF's rule)."""
        return (self.num_experts > 0 and layer_id not in self.mlp_only_layers
                and (layer_id + 1) % self.decoder_sparse_step == 0)

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise before any work if the model cannot be split over `tp` ranks."""
        kv = self.num_key_value_heads
        for name, value in (("num_attention_heads", self.num_attention_heads), ("vocab_size", self.vocab_size),
                            ("intermediate_size", self.intermediate_size),
                            ("moe_intermediate_size", self.moe_intermediate_size),
                            ("shared_expert_intermediate_size", self.shared_expert_intermediate_size)):
            if value % tp:
                raise ValueError(f"tensor_parallel_size {tp} must divide {name} ({value})")
        if kv % tp and tp % kv:
            raise ValueError(f"tensor_parallel_size {tp} must divide num_key_value_heads ({kv}) or be a multiple of it")

    def resolve_dtype(self, requested: str, device: torch.device) -> torch.dtype:
        if requested != "auto":
            return DTYPES[requested]
        dtype = DTYPES.get(self.torch_dtype, torch.float32)
        # half precision on CPU is slow and inexact; the CPU path is the exact reference
        return torch.float32 if device.type == "cpu" else dtype
