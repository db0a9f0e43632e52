"""A bench.py workload through the scheduler alone, on any machine in seconds: no model, every
sampled id random, the KV cache as many tokens as a GPU run reported (`kv_cache_tokens` in
bench.py's --json). It counts what the schedule decides and bytes cannot: steps (each reads the
weights once), preemptions, the tokens prefilled again after them, decode rows per step,
and the KV tokens the decode steps read. Steps run one at a time (no overlap scheduling).

    python benchmarks/schedule_sim.py --workload pressure --kv-tokens 346112   # an H100 80GB at 0.5
    python benchmarks/schedule_sim.py --workload shared-prefix --kv-tokens 642560
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package
import bench  # noqa: E402
from nanovllm.engine.block_manager import BlockManager  # noqa: E402
from nanovllm.engine.scheduler import Scheduler  # noqa: E402
from nanovllm.engine.sequence import Sequence  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="pressure", choices=[n for n, s in bench.WORKLOADS.items() if s.n == 1])
    p.add_argument("--kv-tokens", type=int, default=346_112, help="KV cache size in tokens (default: the H100's "
                   "for pressure)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=4096)
    args = p.parse_args()
    workload = bench.make_workload(bench.WORKLOADS[args.workload])
    scheduler = Scheduler(BlockManager(args.kv_tokens // args.block_size, args.block_size), args.max_num_seqs,
                          args.max_num_batched_tokens, args.max_model_len, frozenset())
    for prompt, max_tokens in zip(workload.prompt_token_ids, workload.max_tokens):
        scheduler.add(Sequence(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    rng = random.Random(0)
    steps = prefill_tokens = decode_rows = kv_read = 0
    while not scheduler.is_finished():
        batch = scheduler.schedule()
        decodes = batch.seqs[:batch.num_decodes]
        steps += 1
        decode_rows += len(decodes)
        prefill_tokens += sum(batch.num_scheduled_tokens[batch.num_decodes:])
        kv_read += sum(seq.num_computed_tokens + 1 for seq in decodes)
        sampling = scheduler.on_launch(batch)
        scheduler.on_output(batch, {seq.seq_id: rng.randrange(bench.MAX_TOKEN_ID) for seq in sampling})
    prompt_tokens, _, requests = workload.totals
    print(f"{args.workload}: {requests} requests, KV cache {args.kv_tokens:,} tokens; {steps:,} steps, "
          f"{decode_rows / steps:.0f} decode rows a step on average, {scheduler.num_preemptions} preemptions; "
          f"tokens prefilled {prefill_tokens:,} ({prompt_tokens:,} in the prompts; recompute included, "
          f"prefix-cache hits not); KV tokens read by decodes {kv_read:,}")


if __name__ == "__main__":
    main()
