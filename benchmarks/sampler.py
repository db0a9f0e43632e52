"""Time the Sampler alone on one device: one decode step's logits for a full batch.

For each parameter mix, the SamplingTensors are built on the host once (their build time
is reported as `host ms`: the engine pays it every step), moved to the device, and the
sampler is timed on random logits: warmup calls dropped, then the median (and p10/p90)
of `--iters` calls, timed with torch.cuda.Event on CUDA (perf_counter after a
synchronize on CPU).

  python benchmarks/sampler.py                                  # cuda: batch 256 x vocab 151936, bf16 logits
  python benchmarks/sampler.py --device cpu                     # cpu: vocab 4096 by default (slow)
  python benchmarks/sampler.py --mixes greedy top-p --iters 200
  python benchmarks/sampler.py --kernels                        # and each kernel's device time (torch.profiler)
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package

from nanovllm.engine.sampling_batch import build_sampling_tensors  # noqa: E402
from nanovllm.engine.sequence import Sequence  # noqa: E402
from nanovllm.layers.sampler import Sampler, SamplingTensors  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402

QWEN3_VOCAB = 151_936
CPU_VOCAB = 4096
EOS_IDS = frozenset({QWEN3_VOCAB - 1})
HISTORY_LEN = 512   # prompt + output tokens of each sequence (penalties read them)

# each mix: row i -> its SamplingParams
MIXES: dict[str, Callable[[int], SamplingParams]] = {
    "greedy": lambda i: SamplingParams(temperature=0),
    "temperature": lambda i: SamplingParams(temperature=0.7),
    "top-k": lambda i: SamplingParams(temperature=0.7, top_k=50),
    "top-p": lambda i: SamplingParams(temperature=0.7, top_p=0.9),
    "top-k+top-p": lambda i: SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
    "min-p": lambda i: SamplingParams(temperature=0.7, min_p=0.05),
    "mixed": lambda i: [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9),
                        SamplingParams(temperature=0.7, top_k=50), SamplingParams(temperature=1.0, min_p=0.1)][i % 4],
    "seeded-1/16": lambda i: SamplingParams(temperature=0.7, seed=i if i % 16 == 0 else None),
    "penalties": lambda i: SamplingParams(temperature=0.7, repetition_penalty=1.1, frequency_penalty=0.2),
    "logprobs-5": lambda i: SamplingParams(temperature=0.7, logprobs=5),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=None, help=f"default {QWEN3_VOCAB} (cuda) / {CPU_VOCAB} (cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="logits dtype")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    p.add_argument("--logit-scale", type=float, default=3.0,
                   help="logits ~ N(0, scale^2): 3 puts top-p 0.9 at T 0.7 on a few hundred ids; 0.5 is a flat row, "
                        "as a random-weight model's, where top-p keeps most of the vocabulary")
    p.add_argument("--kernels", action="store_true",
                   help="cuda: also profile --iters calls and print each kernel's device time per call")
    args = p.parse_args(argv)
    if args.vocab is None:
        args.vocab = QWEN3_VOCAB if args.device.startswith("cuda") else CPU_VOCAB
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is available; pass --device cpu")
    if args.kernels and not args.device.startswith("cuda"):
        p.error(f"--kernels profiles CUDA kernels; --device is {args.device}")
    return args


def make_seqs(mix: Callable[[int], SamplingParams], batch: int, vocab: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):
        history = torch.randint(0, vocab, (HISTORY_LEN,), generator=g).tolist()
        seq = Sequence(history[:HISTORY_LEN // 2], mix(i))
        seq.token_ids.extend(history[HISTORY_LEN // 2:])
        seqs.append(seq)
    return seqs


def to_device(obj, device: torch.device):
    """Every tensor field of a (nested) frozen dataclass, moved to `device`."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = to_device(value, device)
    return dataclasses.replace(obj, **changes)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def kernel_name(symbol: str) -> str:
    """A kernel's short name: torch's templated C++ symbols lose their namespaces and arguments."""
    return symbol.split("<")[0].split("::")[-1].split("(")[0].removeprefix("void ").strip()


def kernel_times(fn: Callable[[], object], iters: int) -> dict[str, float]:
    """Device microseconds per call of each CUDA kernel `fn` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            name = kernel_name(e.key)
            times[name] = times.get(name, 0.0) + e.device_time_total / iters
    return times


def bench_mix(name: str, args, sampler: Sampler, device: torch.device) -> dict:
    seqs = make_seqs(MIXES[name], args.batch, args.vocab)
    t0 = time.perf_counter()
    host = build_sampling_tensors(seqs, EOS_IDS)
    host_ms = (time.perf_counter() - t0) * 1e3
    tensors: SamplingTensors = to_device(host, device)
    logits = torch.randn(args.batch, args.vocab, device=device).mul_(args.logit_scale).to(getattr(torch, args.dtype))
    generator = torch.Generator(device=device).manual_seed(0)
    call = lambda: sampler(logits, tensors, generator)  # noqa: E731
    times = sorted(time_calls(call, device, args.warmup, args.iters))
    return {"mix": name, "median": statistics.median(times), "p10": times[len(times) // 10],
            "p90": times[(len(times) * 9) // 10], "host": host_ms,
            "kernels": kernel_times(call, args.iters) if args.kernels else {}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"sampler benchmark: device {args.device} ({name}), batch {args.batch}, vocab {args.vocab}, "
          f"logits {args.dtype}, warmup {args.warmup}, iters {args.iters}, torch {torch.__version__}")
    sampler = Sampler()
    print(f"{'mix':<14}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}{'rows/s':>12}{'host ms':>10}")
    for mix in args.mixes:
        r = bench_mix(mix, args, sampler, device)
        rows_per_s = args.batch / (r["median"] / 1e3)
        print(f"{r['mix']:<14}{r['median']:>11.3f}{r['p10']:>9.3f}{r['p90']:>9.3f}{rows_per_s:>12,.0f}"
              f"{r['host']:>10.2f}")
        if r["kernels"]:
            print("    device us a call: " + ", ".join(f"{k} {t:.1f}" for k, t in sorted(r["kernels"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
