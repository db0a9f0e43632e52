"""Where does a step's time go? Runs the bench workload (or a slice of it) and reports wall
time per engine phase, plus the top GPU kernels of a few decode steps.

    python benchmarks/profile_step.py [--model DIR] [--num-seqs 256] [--attention-backend auto]

Phases are timed by wrapping the engine's methods with a synchronizing timer, so the sum
is slower than an unwrapped run; read the shares, not the absolute total. With `--host`
the timers do not synchronize: they show the host's own time per phase and how long it
waits for the device ("wait for sampled ids"); with overlap on, a GPU-bound engine
spends its spare host time there.
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402  (the workload and the default checkpoint)
import nanovllm.engine.llm_engine as llm_engine_module  # noqa: E402
import nanovllm.engine.sampling_batch as sampling_batch  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402

TOTALS = collections.defaultdict(float)
COUNTS = collections.Counter()


SYNC = True


def timed(name, fn):
    def wrapper(*args, **kwargs):
        if SYNC:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if SYNC:
            torch.cuda.synchronize()
        TOTALS[name] += time.perf_counter() - start
        COUNTS[name] += 1
        return out
    return wrapper


def instrument(llm: LLM) -> None:
    llm.scheduler.schedule = timed("schedule", llm.scheduler.schedule)
    llm.scheduler.on_output = timed("on_output", llm.scheduler.on_output)
    llm_engine_module.build_step_inputs = timed("build_step_inputs", llm_engine_module.build_step_inputs)
    runner = llm.model_runner
    runner.forward = timed("forward (model + lm head)", runner.forward)
    runner.sampler.forward = timed("sampler", runner.sampler.forward)
    runner.run = timed("run (to device + forward + sample)", runner.run)
    if hasattr(llm, "outputs"):
        llm.outputs.process = timed("outputs.process", llm.outputs.process)
    llm.step = timed("step", llm.step)
    sampling_batch.PendingOutput.result = timed("wait for sampled ids", sampling_batch.PendingOutput.result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--host", action="store_true", help="time host phases without synchronizing")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    args = p.parse_args()
    global SYNC
    SYNC = not args.host
    model = args.model or bench.default_model_dir()
    llm = LLM(model, max_model_len=4096, attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
              enable_overlap=not args.no_overlap)
    workload = bench.make_workload(args.num_seqs, 1024, 1024)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in workload.max_tokens]
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
    plain = time.perf_counter() - start
    instrument(llm)
    start = time.perf_counter()
    llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
    wrapped = time.perf_counter() - start
    print(f"engine info: {llm.engine_info()}")
    print(f"unwrapped run {plain:.2f}s ({workload.num_output_tokens / plain:.0f} tok/s); instrumented {wrapped:.2f}s")
    print(f"{'phase':40s} {'calls':>7s} {'total s':>9s} {'ms/call':>9s}")
    for name, total in sorted(TOTALS.items(), key=lambda kv: -kv[1]):
        print(f"{name:40s} {COUNTS[name]:7d} {total:9.3f} {1000 * total / COUNTS[name]:9.3f}")
    if not args.no_kernels:
        profile_decode(llm, workload)


def profile_decode(llm: LLM, workload) -> None:
    """Top kernels over a few full-batch decode steps."""
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=24)
    prompts = workload.prompt_token_ids[:256]
    llm.generate(prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2), use_tqdm=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
