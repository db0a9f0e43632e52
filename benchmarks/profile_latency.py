"""Where a step's time goes at batch 1 and in mixed steps: wall time per token, the host's
time per engine phase (timers that do not synchronize), and the GPU's kernel time per step
(torch.profiler), on the bench's random-weight Qwen3-0.6B.

    python benchmarks/profile_latency.py flash triton     # one or more attention backends
    python benchmarks/profile_latency.py flash:b1         # batch 1 only
    python benchmarks/profile_latency.py flash:b256       # pure decode at batch 256 only
    python benchmarks/profile_latency.py flash:json       # batch 256 under a JSON schema: host phases

Mixed steps: 1,024 (timed) and 600 (profiled) requests sharing a 1,024-token prefix with
32-256 own tokens and outputs, so admission goes on while up to 512 sequences decode. When
the host's time per step exceeds the GPU's kernel time per step, the engine is host-bound.
"""
import collections
import random
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH, which picks the package
import bench  # noqa: E402
import nanovllm.engine.llm_engine as E  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402

T = collections.defaultdict(float)
C = collections.Counter()


def timed(name, fn):
    def w(*a, **k):
        s = time.perf_counter()
        out = fn(*a, **k)
        T[name] += time.perf_counter() - s
        C[name] += 1
        return out
    return w


def kernel_table(prof, steps, label):
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in ev)
    count = sum(e.count for e in ev)
    print(f"[{label}] GPU kernel time per step {total / steps / 1000:.3f} ms, kernels per step {count / steps:.0f}")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"   {e.self_device_time_total / steps / 1000:8.4f} ms/step {e.count / steps:6.1f}/step  {e.key[:90]}")


def shared_prefix(n, rng):
    prefix = [rng.randint(0, 10000) for _ in range(1024)]
    prompts = [prefix + [rng.randint(0, 10000) for _ in range(rng.randint(32, 256))] for _ in range(n)]
    return prompts, [rng.randint(32, 256) for _ in range(n)]


def decode_batch(llm, backend: str, num_seqs: int = 256, prompt_len: int = 512, steps: int = 64):
    """Kernel time per pure decode step at `num_seqs` (the reference workload's steady state):
    the profiler skips the prefill steps and records `steps` decode steps."""
    rng = random.Random(4)
    prompts = [[rng.randint(0, 10000) for _ in range(prompt_len)] for _ in range(num_seqs)]
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps + 48)
    llm.generate(prompts[:8], sp, use_tqdm=False)
    s = time.perf_counter(); llm.generate(prompts, sp, use_tqdm=False); t = time.perf_counter() - s
    print(f"== {backend}: batch-{num_seqs} {t * 1000:.1f} ms for {steps + 48} tokens each (prefill included)")
    skip = 40  # prefill steps (16k tokens each) and the first decodes
    schedule = torch.profiler.schedule(wait=skip, warmup=1, active=steps, repeat=1)
    step = llm.step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], schedule=schedule) as prof:
        def profiled_step():
            out = step()
            prof.step()
            return out
        llm.step = profiled_step
        llm.generate([p[::-1] for p in prompts], sp, use_tqdm=False)
    llm.step = step
    kernel_table(prof, steps, f"{backend} batch-{num_seqs} decode")


def constrained_batch(llm, backend: str, num_seqs: int = 256, steps: int = 96):
    """Host time per phase of grammar-constrained steps (every row under a one-string JSON
    schema) beside the same batch unconstrained: the mask is filled while the forward runs, so
    the device idles only when the host's phases outgrow it. Per-call averages include the
    batch's prefill steps (~8 of ~100)."""
    rng = random.Random(5)
    prompts = [[rng.randint(0, 10000) for _ in range(512)] for _ in range(num_seqs)]
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for label, extra in (("unconstrained", {}), ("json", {"structured_outputs": {"json": schema}})):
        sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps, **extra)
        llm.generate(prompts[:4], sp, use_tqdm=False)
        T.clear(); C.clear()
        llm.step = timed("step", llm.step)
        runner, grammars = llm.model_runner, llm.grammars
        for obj, names in ((runner, ("run", "launch", "sample")), (grammars, ("fill", "advance")),
                           (llm.outputs, ("process",)), (llm.scheduler, ("schedule",))):
            for name in names:
                setattr(obj, name, timed(f"{type(obj).__name__}.{name}", getattr(obj, name)))
        E.PendingOutput.result = timed("wait", E._orig_res)
        s = time.perf_counter(); llm.generate(prompts, sp, use_tqdm=False); t = time.perf_counter() - s
        print(f"== {backend} {label}: batch-{num_seqs} {t / C['step'] * 1000:.2f} ms/step wall, {C['step']} steps")
        for k, v in sorted(T.items(), key=lambda kv: -kv[1]):
            print(f"   host {k:28s} {v / C[k] * 1000:8.3f} ms/call  x{C[k]}")
        for obj in (llm, runner, grammars, llm.outputs, llm.scheduler):  # back to the class methods
            for name in [n for n in vars(obj) if n in ("step", "run", "launch", "sample", "fill", "advance",
                                                       "process", "schedule")]:
                delattr(obj, name)
        E.PendingOutput.result = E._orig_res
    T.clear(); C.clear()


def main(backend, mode=""):
    s = time.perf_counter()
    llm = LLM(bench.default_model_dir(), max_model_len=4096, attention_backend=backend)
    print(f"   LLM() {time.perf_counter() - s:.1f}s {llm.engine_info()}")
    if not hasattr(E, "_orig_bsi"):
        E._orig_bsi, E._orig_res = E.build_step_inputs, E.PendingOutput.result
    if mode in ("b256", "json"):
        (decode_batch if mode == "b256" else constrained_batch)(llm, backend)
        llm.exit()
        return
    rng = random.Random(1)
    prompt = [rng.randint(0, 10000) for _ in range(512)]
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=257)
    llm.generate([prompt], sp, use_tqdm=False)
    s = time.perf_counter(); llm.generate([prompt[::-1]], sp, use_tqdm=False); t = time.perf_counter() - s
    print(f"== {backend}: batch-1 {t / 257 * 1000:.3f} ms/token wall")
    llm.step = timed("step", llm.step)
    llm.scheduler.schedule = timed("schedule", llm.scheduler.schedule)
    E.build_step_inputs = timed("build_step_inputs", E._orig_bsi)
    llm.model_runner.run = timed("runner.run", llm.model_runner.run)
    llm.outputs.process = timed("outputs.process", llm.outputs.process)
    E.PendingOutput.result = timed("wait", E._orig_res)
    llm.generate([prompt[1:]], sp, use_tqdm=False)
    for k, v in sorted(T.items(), key=lambda kv: -kv[1]):
        print(f"   host {k:20s} {v / C[k] * 1000:8.3f} ms/call  x{C[k]}")
    T.clear(); C.clear()
    import cProfile, pstats  # noqa: E401  where the host's time per step goes, by function
    with cProfile.Profile() as host:
        llm.generate([prompt[3:]], sp, use_tqdm=False)
    pstats.Stats(host).sort_stats("tottime").print_stats(22)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt[2:]], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=65), use_tqdm=False)
    kernel_table(prof, 65, f"{backend} batch-1")
    if mode == "b1":
        llm.exit()
        return
    prompts, outs = shared_prefix(1024, random.Random(2))
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in outs]
    s = time.perf_counter(); llm.generate(prompts, params, use_tqdm=False); t = time.perf_counter() - s
    steps = C["step"]
    print(f"== {backend}: shared-prefix 1024 req: {sum(outs) / t:.0f} tok/s, {t:.2f}s, {steps} steps, "
          f"{t / max(steps, 1) * 1000:.2f} ms/step")
    for k, v in sorted(T.items(), key=lambda kv: -kv[1]):
        print(f"   host {k:20s} {v / C[k] * 1000:8.3f} ms/call  x{C[k]}")
    T.clear(); C.clear()
    prompts, outs = shared_prefix(600, random.Random(3))
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in outs]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        s = time.perf_counter(); llm.generate(prompts, params, use_tqdm=False); t = time.perf_counter() - s
    kernel_table(prof, C["step"], f"{backend} shared-prefix 600 (profiled, {t / C['step'] * 1000:.2f} ms/step wall)")
    T.clear(); C.clear()
    llm.exit()


if __name__ == "__main__":
    import nanovllm
    print("package:", nanovllm.__file__)
    import gc
    for b in sys.argv[1:]:
        s = time.perf_counter()
        main(*(b.split(":") + [""])[:2])
        gc.collect()
        torch.cuda.empty_cache()
        print(f"-- {b} total {time.perf_counter() - s:.1f}s")
