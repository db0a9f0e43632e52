"""Where a workload's time goes, step by step: runs one bench.py workload (same requests, same
engine settings) and records every engine step's wall time with what it carried: prefill
tokens, decode rows, and the KV tokens its attention reads. It then sums the time by kind of
step (steps carrying prefill; pure decode by batch size) beside each kind's bytes bound:
the weights read once plus the KV read, at --bandwidth.

    python benchmarks/profile_step.py                                 # the reference workload
    python benchmarks/profile_step.py --workload long
    python benchmarks/profile_step.py --model-config qwen3-30b-a3b    # the MoE model
    python benchmarks/profile_step.py --kernels 400:50                # + GPU kernel time of steps 400-449
    python benchmarks/profile_step.py --workload chat --host-phases   # + the host's time per phase of a step

Takes bench.py's flags. With overlap on, a step's wall time is, in the steady state, the
device time of the step before it: read the sums by kind, not single steps. The bound counts
every weight once per step (an MoE step at a small batch reads fewer experts than that)."""
import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH, which picks the package
import bench  # noqa: E402
from nanovllm import LLM  # noqa: E402
from nanovllm.engine.kv_cache import kv_cache_dtype  # noqa: E402
from profile_latency import kernel_table  # noqa: E402

DECODE_BUCKETS = (1, 16, 64, 128, 256, 512, 1 << 30)   # upper bounds of the decode-row buckets


def kv_bytes_per_token(llm: LLM) -> int:
    m, runner = llm.model_config, llm.model_runner
    element = kv_cache_dtype(llm.config.kv_cache_dtype, runner.dtype).itemsize
    return m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * element


def record_steps(llm: LLM) -> list[tuple[float, int, int, int]]:
    """Wrap the engine's step: each call appends (seconds, prefill tokens, decode rows, KV tokens read)."""
    steps, schedule, step = [], llm.scheduler.schedule, llm.step
    scheduled = []

    def timed_schedule():
        batch = schedule()
        scheduled.append(sum(seq.num_computed_tokens + n for seq, n in zip(batch.seqs, batch.num_scheduled_tokens)))
        return batch

    def timed_step():
        start = time.perf_counter()
        out = step()
        _, prefill, decodes = out
        steps.append((time.perf_counter() - start, prefill, decodes, scheduled.pop() if scheduled else 0))
        return out
    llm.scheduler.schedule, llm.step = timed_schedule, timed_step
    return steps


def bucket(prefill: int, decodes: int) -> tuple[int, str]:
    """(sort order, label) of a step's kind: steps carrying prefill, or decode-only by rows."""
    if prefill:
        return -2, "with prefill"
    if not decodes:
        return -1, "drain (no launch)"
    i = next(i for i, upper in enumerate(DECODE_BUCKETS) if decodes <= upper)
    if i == 0:
        return i, "decode 1"
    upper = DECODE_BUCKETS[i] if i < len(DECODE_BUCKETS) - 1 else ""
    return i, f"decode {DECODE_BUCKETS[i - 1] + 1}-{upper}"


def report(steps, weight_bytes: int, kv_bytes: int, bandwidth: float) -> None:
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0, 0, 0])   # steps, seconds, bound s, tokens, decodes
    for seconds, prefill, decodes, kv_tokens in steps:
        r = rows[bucket(prefill, decodes)]
        r[0] += 1
        r[1] += seconds
        r[2] += (weight_bytes + kv_tokens * kv_bytes) / bandwidth
        r[3] += prefill
        r[4] += decodes
    total = sum(r[1] for r in rows.values())
    print(f"{'kind of step':18s} {'steps':>6s} {'seconds':>8s} {'share':>6s} {'ms/step':>8s} {'bound ms':>8s} "
          f"{'x bound':>7s} {'prefill tok':>11s} {'decode tok':>10s}")
    for key in sorted(rows):
        n, s, b, p, d = rows[key]
        name = key[1]
        print(f"{name:18s} {n:6d} {s:8.3f} {s / total:6.1%} {s / n * 1e3:8.3f} {b / n * 1e3:8.3f} {s / b:7.2f} "
              f"{p:11d} {d:10d}")
    print(f"{'all':18s} {sum(r[0] for r in rows.values()):6d} {total:8.3f}")


HOST_PHASES = ("schedule", "build inputs", "launch", "sample", "process (+ wait)")


def record_host_phases(llm: LLM) -> dict:
    """Wrap the host's phases of a step: {(kind, phase): seconds} and {kind: steps}, kind being
    "with prefill" or "decode" (what the step scheduled). `process` handles the step before
    (with overlap) and first waits for its sampled ids: where a GPU-bound host idles."""
    import nanovllm.engine.llm_engine as engine
    seconds, counts, kind = collections.defaultdict(float), collections.Counter(), ["decode"]

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds[kind[0], phase] += time.perf_counter() - start
            return out
        return wrapper

    schedule = timed(llm.scheduler.schedule, "schedule")

    def scheduled():
        batch = schedule()
        if batch.seqs:  # NOTE: a drain step (nothing left to launch) keeps the kind before it
            kind[0] = "with prefill" if batch.num_tokens > batch.num_decodes else "decode"
            counts[kind[0]] += 1
        return batch
    llm.scheduler.schedule = scheduled
    engine.build_step_inputs = timed(engine.build_step_inputs, "build inputs")
    runner = llm.model_runner
    runner.launch, runner.sample = timed(runner.launch, "launch"), timed(runner.sample, "sample")
    llm._process = timed(llm._process, "process (+ wait)")
    return {"seconds": seconds, "counts": counts}


def host_phase_table(phases: dict) -> None:
    for kind, n in sorted(phases["counts"].items()):
        cells = "  ".join(f"{phase} {phases['seconds'][kind, phase] / n * 1e3:.2f}" for phase in HOST_PHASES)
        print(f"host ms/step, {kind} ({n} steps): {cells}")


# GPU kernels on CUDA; on CPU the profiler records ops only (and the kernel table stays empty)
ACTIVITY = torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU


def profile_kernels(llm: LLM, first: int, count: int):
    """Wrap the engine's step in torch.profiler: the kernels of steps first+1..first+count."""
    prof = torch.profiler.profile(activities=[ACTIVITY],
                                  schedule=torch.profiler.schedule(wait=first, warmup=1, active=count, repeat=1))
    step = llm.step

    def profiled_step():
        out = step()
        prof.step()
        return out
    llm.step = profiled_step
    prof.start()
    return prof


def window_kernel_table(prof, steps: list, first: int, count: int) -> None:
    """profile_latency's kernel table of the window, labelled with its wall time and decode rows."""
    window = steps[first + 1:first + 1 + count]
    wall = sum(s[0] for s in window) * 1e3 / max(len(window), 1)
    rows = sum(s[2] for s in window) / max(len(window), 1)
    kernel_table(prof, count, f"steps {first + 1}-{first + count}, mean {rows:.0f} decode rows, wall {wall:.3f} ms/step")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bandwidth", type=float, default=4.3, help="TB/s the bound assumes (the H200's copy rate)")
    p.add_argument("--kernels", metavar="FIRST:COUNT", help="also profile the GPU kernels of COUNT steps from FIRST")
    p.add_argument("--host-phases", action="store_true", help="also time the host's phases of each kind of step")
    ours, rest = p.parse_known_args(argv)
    args = bench.parse_args(rest)
    model = args.model or bench.prepare_model(args.model_config, bench.resolved_load_format(args))
    (workload,) = bench.build_workloads(args).values()
    workload = bench.fit_to_vocab(workload, bench.model_vocab_size(model))
    runner = bench.NanoRunner(model, bench.engine_config(args, workload.spec))  # the requests bench.py sends
    runner.warmup()
    llm = runner.llm
    run = runner.prepare(workload)
    steps = record_steps(llm)
    phases = record_host_phases(llm) if ours.host_phases else None
    window = tuple(map(int, ours.kernels.split(":"))) if ours.kernels else None
    prof = profile_kernels(llm, *window) if window else None
    start = time.perf_counter()
    generated = run()
    seconds = time.perf_counter() - start
    if prof:
        prof.stop()
    weight_bytes = sum(t.numel() * t.element_size() for t in llm.model_runner.model.parameters())
    kv_bytes = kv_bytes_per_token(llm)
    print(f"{workload.spec.name}: {generated} tokens in {seconds:.2f}s = {generated / seconds:.0f} tok/s; weights "
          f"{weight_bytes / 1e9:.2f} GB, KV {kv_bytes / 1024:.0f} KiB/token; "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    report(steps, weight_bytes, kv_bytes, ours.bandwidth * 1e12)
    if phases:
        host_phase_table(phases)
    if prof:
        window_kernel_table(prof, steps, *window)
    llm.exit()


if __name__ == "__main__":
    main()
