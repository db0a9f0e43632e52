"""Throughput benchmark on the reference nano-vLLM workload, reproduced bit-for-bit.

    python bench.py                        # nanovllm; random-weight Qwen3-0.6B, made once and cached
    python bench.py --dry-run              # the workload's totals (its checksum); no model, no engine
    python bench.py --json out.json        # + latency probes, peak GPU memory, KV cache size
    python bench.py --backend hf --num-seqs 64   # HF transformers `generate` baseline (slow)
    python bench.py --device cpu --model <tiny ckpt> --num-seqs 4 --max-input-len 32 --max-output-len 16

Throughput = generated tokens / wall seconds of one timed `generate` call; the warmup is dropped.
Random weights change nothing about speed: every request runs to its max_tokens (ignore_eos).
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import torch

from nanovllm.utils.random_checkpoint import QWEN3_0_6B_CONFIG

CHECKPOINT_SEED = 0

# The reference workload. NOTE: its totals are the checksum that makes numbers comparable across
# projects; any change to the order of random draws changes them.
WORKLOAD_SEED = 0
MIN_LEN = 100           # prompt lengths and max_tokens are randint(100, max)
MAX_TOKEN_ID = 10000    # prompt ids are randint(0, 10000), inclusive
TEMPERATURE = 0.6
REFERENCE_SHAPE = (256, 1024, 1024)           # (num_seqs, max_input_len, max_output_len)
REFERENCE_TOTALS = (142_827, 133_966)         # (prompt tokens, output tokens)

# Latency probes (--json only). Each probe draws fresh prompts so no prefix-cache hit shortens a prefill.
PROBE_SEED = 1
PROBE_PROMPT_LEN = 512
TTFT_RUNS = 5
BATCH1_DECODE_STEPS = 256      # batch-1 probe: 1 + 256 output tokens
FULL_BATCH_PROMPT_LEN = 1
FULL_BATCH_DECODE_STEPS = 128  # full-batch probe: t(1 + 128 tokens) - t(1 token)


class Workload(NamedTuple):
    prompt_token_ids: list[list[int]]
    max_tokens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompt_token_ids))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


class Timing(NamedTuple):
    seconds: float
    num_output_tokens: int


def make_workload(num_seqs: int, max_input_len: int, max_output_len: int) -> Workload:
    """The reference draws: all prompts first (each: its length, then its ids), then all max_tokens.

    `random.Random(0)` yields the same stream as the reference's `random.seed(0)` + `random.randint`,
    without sharing the global generator with anything else in the process."""
    rng = random.Random(WORKLOAD_SEED)
    # NOTE: min(MIN_LEN, max) only matters for tiny CPU runs (max < 100); the defaults draw exactly as the reference.
    in_lo, out_lo = min(MIN_LEN, max_input_len), min(MIN_LEN, max_output_len)
    prompts = [[rng.randint(0, MAX_TOKEN_ID) for _ in range(rng.randint(in_lo, max_input_len))]
               for _ in range(num_seqs)]
    max_tokens = [rng.randint(out_lo, max_output_len) for _ in range(num_seqs)]
    return Workload(prompts, max_tokens)


def fit_to_vocab(workload: Workload, vocab_size: int | None) -> Workload:
    """Fold ids into a small test model's vocabulary; lengths (and so the checksum) are kept."""
    if vocab_size is None or vocab_size > MAX_TOKEN_ID:
        return workload
    prompts = [[t % vocab_size for t in p] for p in workload.prompt_token_ids]
    return workload._replace(prompt_token_ids=prompts)


def is_reference(args) -> bool:
    return (args.num_seqs, args.max_input_len, args.max_output_len) == REFERENCE_SHAPE


# ---------------------------------------------------------------- model checkpoint

def default_model_dir() -> str:
    """A random-weight bf16 Qwen3-0.6B checkpoint in the user cache, made once, keyed by its recipe."""
    recipe = {"config": QWEN3_0_6B_CONFIG, "dtype": "bfloat16", "seed": CHECKPOINT_SEED}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = os.path.join(cache, "nanovllm", f"qwen3-0.6b-random-{key}")
    if not os.path.isdir(path):
        from nanovllm.utils.random_checkpoint import make_random_checkpoint
        print(f"Making a random-weight Qwen3-0.6B checkpoint (once) at {path}", file=sys.stderr)
        tmp = f"{path}.tmp-{os.getpid()}"
        make_random_checkpoint(tmp, QWEN3_0_6B_CONFIG, seed=CHECKPOINT_SEED, dtype=torch.bfloat16)
        try:
            os.rename(tmp, path)  # NOTE: atomic, so a half-written checkpoint is never found at `path`
        except OSError:           # another process finished first; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_vocab_size(model: str) -> int | None:
    try:
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f).get("vocab_size")
    except OSError:
        return None


# ---------------------------------------------------------------- backends

def cuda_in_use() -> bool:
    # NOTE: never initialize CUDA in this process just to sync or read memory (tensor parallel
    # workers may hold the GPUs; a stray context costs ~0.5 GiB).
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def synchronize():
    if cuda_in_use():
        torch.cuda.synchronize()


class NanoRunner:
    """nanovllm.LLM; `prepare` builds the requests so the clock covers only `generate`."""
    name = "nanovllm"

    def __init__(self, model: str, engine_config: dict, num_seqs: int):
        from nanovllm import LLM
        self.llm = LLM(model, **engine_config)
        self.full_batch = num_seqs

    def warmup(self):
        from nanovllm import SamplingParams
        self.llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)

    def prepare(self, prompts: list[list[int]], max_tokens: list[int]) -> Callable[[], int]:
        from nanovllm import SamplingParams
        params = [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]

        def run() -> int:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return sum(len(o["token_ids"]) for o in outputs)
        return run

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

    def __init__(self, model: str, device: str, batch_size: int, num_seqs: int):
        from transformers import AutoModelForCausalLM
        self.device, self.batch_size = device, batch_size
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()
        self.full_batch = min(num_seqs, batch_size)

    def warmup(self):
        self.prepare([[1] * 8], [8])()

    def prepare(self, prompts: list[list[int]], max_tokens: list[int]) -> Callable[[], int]:
        bs = self.batch_size
        batches = [(*self._left_pad(prompts[i:i + bs]), max(max_tokens[i:i + bs]))
                   for i in range(0, len(prompts), bs)]

        def run() -> int:
            for input_ids, attention_mask, num_new in batches:
                self._generate(input_ids, attention_mask, num_new)
            return sum(max_tokens)  # NOTE: each request counts only the tokens it asked for
        return run

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.PAD_ID] * (width - len(p)) + p for p in prompts])     # [batch, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [batch, width]
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_new: int):
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=TEMPERATURE,
            top_k=0, top_p=1.0, max_new_tokens=num_new, min_new_tokens=num_new, pad_token_id=self.PAD_ID)
        # out: [batch, width + num_new]
        assert out.shape[1] == input_ids.shape[1] + num_new, (out.shape, input_ids.shape, num_new)

    def engine_info(self) -> dict:
        return {"device": str(self.model.device), "dtype": str(self.model.dtype), "kv_cache_tokens": None}

    def close(self):
        pass


# ---------------------------------------------------------------- measurements

def timed_generate(runner, prompts: list[list[int]], max_tokens: list[int]) -> Timing:
    run = runner.prepare(prompts, max_tokens)
    synchronize()
    start = time.perf_counter()
    num_output_tokens = run()  # generate returns once the tokens are on the host
    synchronize()
    return Timing(time.perf_counter() - start, num_output_tokens)


def measure_latency(runner, vocab_size: int | None, max_model_len: int) -> dict:
    """TTFT of one 512-token prompt on the idle engine, and time per output token at batch 1 and full batch."""
    rng = random.Random(PROBE_SEED)
    id_hi = min(MAX_TOKEN_ID, (vocab_size or MAX_TOKEN_ID + 1) - 1)

    def probe(num_seqs: int, prompt_len: int, max_tokens: int) -> float:
        prompts = [[rng.randint(0, id_hi) for _ in range(prompt_len)] for _ in range(num_seqs)]
        return timed_generate(runner, prompts, [max_tokens] * num_seqs).seconds

    if PROBE_PROMPT_LEN + 1 + BATCH1_DECODE_STEPS > max_model_len:
        return {"skipped": f"probes need max_model_len >= {PROBE_PROMPT_LEN + 1 + BATCH1_DECODE_STEPS}"}
    probe(1, PROBE_PROMPT_LEN, 1)  # discarded: the first 512-token prefill may still compile or tune kernels
    ttft = statistics.median(probe(1, PROBE_PROMPT_LEN, 1) for _ in range(TTFT_RUNS))
    batch1 = probe(1, PROBE_PROMPT_LEN, 1 + BATCH1_DECODE_STEPS)
    n = runner.full_batch
    full_prefill = probe(n, FULL_BATCH_PROMPT_LEN, 1)
    full = probe(n, FULL_BATCH_PROMPT_LEN, 1 + FULL_BATCH_DECODE_STEPS)
    return {
        "ttft_s": ttft,
        "tpot_batch1_s": (batch1 - ttft) / BATCH1_DECODE_STEPS,
        "tpot_full_batch_s": (full - full_prefill) / FULL_BATCH_DECODE_STEPS,
        "method": {
            "ttft": f"median of {TTFT_RUNS} generate calls, 1 request, {PROBE_PROMPT_LEN}-token prompt, "
                    "max_tokens=1, after one discarded call; fresh random prompts (no prefix-cache hits)",
            "tpot_batch1": f"(t(1 request, {PROBE_PROMPT_LEN}-token prompt, {1 + BATCH1_DECODE_STEPS} tokens)"
                           f" - ttft) / {BATCH1_DECODE_STEPS}",
            "tpot_full_batch": f"(t({n} requests, {FULL_BATCH_PROMPT_LEN}-token prompts, "
                               f"{1 + FULL_BATCH_DECODE_STEPS} tokens) - t(same shape, 1 token)) / "
                               f"{FULL_BATCH_DECODE_STEPS}; full batch = the workload's request count "
                               "(hf: capped at --hf-batch-size)",
        },
    }


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def git_commit() -> str | None:
    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["nanovllm", "hf"], default="nanovllm")
    p.add_argument("--model", help="HF model directory (default: a cached random-weight Qwen3-0.6B)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (nanovllm)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (nanovllm)")
    p.add_argument("--no-overlap", action="store_true", help="enable_overlap=False: no overlap scheduling (nanovllm)")
    p.add_argument("--max-num-batched-tokens", type=int, help="the step's token budget (nanovllm; default: the engine's)")
    p.add_argument("--attention-backend", default="auto", help="auto|torch|triton|flash (nanovllm)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="KV cache element type: the model's, or fp8 e4m3 with per-token scales (nanovllm)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, help="default: the engine's")
    p.add_argument("--device", help="cuda|cpu (default: cuda if available)")
    p.add_argument("--hf-batch-size", type=int, default=128, help="static batch size (hf)")
    p.add_argument("--dry-run", action="store_true", help="print the workload's totals and exit")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write a JSON record (with latency probes) to PATH, or stdout")
    args = p.parse_args(argv)
    for name in ("num_seqs", "max_input_len", "max_output_len", "tp", "max_model_len", "hf_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.backend == "hf" and args.tp != 1:
        p.error("--tp is for the nanovllm backend only")
    if args.backend == "hf" and args.kv_cache_dtype != "auto":
        p.error("--kv-cache-dtype is for the nanovllm backend only")
    return args


def engine_config(args) -> dict:
    """Exactly the keywords LLM() gets: the reference's (enforce_eager=False, max_model_len=4096) + flags."""
    config = {"enforce_eager": args.enforce_eager, "max_model_len": args.max_model_len,
              "tensor_parallel_size": args.tp, "attention_backend": args.attention_backend}
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
    return config


def backend_config(args) -> dict:
    """What the backend is configured with, for the printed line and the JSON record."""
    if args.backend == "nanovllm":
        return engine_config(args)
    return {"dtype": "bfloat16", "attn_implementation": "sdpa", "batch_size": args.hf_batch_size,
            "padding": "left", "do_sample": True, "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0,
            "max_new_tokens": "the batch's max max_tokens", "min_new_tokens": "= max_new_tokens",
            "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}


def print_totals(args, workload: Workload) -> bool:
    totals = (workload.num_prompt_tokens, workload.num_output_tokens)
    print(f"Workload: {args.num_seqs} requests, prompt tokens: {totals[0]}, output tokens: {totals[1]}")
    if not is_reference(args):
        return True
    ok = totals == REFERENCE_TOTALS
    print("Checksum: " + ("matches the reference workload" if ok else f"MISMATCH, expected {REFERENCE_TOTALS}"))
    return ok


def make_runner(args, model: str):
    if args.backend == "hf":
        return HFRunner(model, backend_config(args)["device"], args.hf_batch_size, args.num_seqs)
    return NanoRunner(model, engine_config(args), args.num_seqs)


def run_benchmark(args, runner, workload: Workload, vocab_size: int | None) -> dict:
    runner.warmup()
    timing = timed_generate(runner, workload.prompt_token_ids, workload.max_tokens)
    throughput = timing.num_output_tokens / timing.seconds
    print(f"Total: {timing.num_output_tokens}tok, Time: {timing.seconds:.2f}s, Throughput: {throughput:.2f}tok/s")
    if timing.num_output_tokens != workload.num_output_tokens:
        print(f"WARNING: generated {timing.num_output_tokens} tokens, the workload asks for "
              f"{workload.num_output_tokens}", file=sys.stderr)
    record = {"total_output_tokens": timing.num_output_tokens, "time_s": timing.seconds,
              "throughput_tok_s": throughput}
    if args.json is None:
        return record
    # Read memory before the probes: this is the peak of the workload itself (init, warmup, timed run).
    # NOTE: this process only; with tensor parallelism, workers' memory is not included.
    record["peak_gpu_memory_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda_in_use() else None
    record["latency"] = measure_latency(runner, vocab_size, args.max_model_len)
    return record


def describe(args, model: str, runner, workload: Workload, record: dict) -> dict:
    info = runner.engine_info()
    device = str(info.get("device", args.device or "cpu"))
    return {
        "backend": runner.name,
        "command": shlex.join(["python", *sys.argv]),
        "args": vars(args),
        "config": backend_config(args),
        "model": model,
        "workload": {"seed": WORKLOAD_SEED, "num_seqs": args.num_seqs, "max_input_len": args.max_input_len,
                     "max_output_len": args.max_output_len, "temperature": TEMPERATURE, "ignore_eos": True,
                     "prompt_tokens": workload.num_prompt_tokens, "output_tokens": workload.num_output_tokens,
                     "is_reference": is_reference(args)},
        "device": device, "device_name": device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "git_commit": git_commit(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kv_cache_tokens": info.get("kv_cache_tokens"), "engine_info": info,
        **record,
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
    workload = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    ok = print_totals(args, workload)
    if args.dry_run:
        return 0 if ok else 1
    model = args.model or default_model_dir()
    vocab_size = model_vocab_size(model)
    workload = fit_to_vocab(workload, vocab_size)
    print(f"Config: backend={args.backend} model={model} {backend_config(args)}")
    runner = make_runner(args, model)
    try:
        record = run_benchmark(args, runner, workload, vocab_size)
        if args.json is not None:
            write_json(args.json, describe(args, model, runner, workload, record))
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
