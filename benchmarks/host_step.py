"""The host's own time per decode step (scheduling, step inputs, output bookkeeping) at a full
batch, on any machine: the real engine on a tiny random checkpoint, with the model's forward and
the sampler stubbed out. With overlap scheduling this work hides behind the device's step only
while it is shorter, so it bounds the short decode steps of a large batch.

    python benchmarks/host_step.py                 # 256 rows, 200 steps, median of 5 runs
    python benchmarks/host_step.py --profile       # and a by-function profile of one run
    python benchmarks/host_step.py --workload chat # a bench.py workload's requests, whole (ids folded)
    PYTHONPATH=<other checkout> python benchmarks/host_step.py   # an older version, same script
"""
import argparse
import contextlib
import cProfile
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.layers.sampler import SamplerOutput  # noqa: E402
from nanovllm.utils.random_checkpoint import make_random_checkpoint  # noqa: E402

VOCAB = 512
CONFIG = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
              eos_token_id=1, bos_token_id=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--workload", help="time the host over this bench.py workload's requests instead")
    args = p.parse_args()
    path = make_random_checkpoint(tempfile.mkdtemp(), CONFIG, seed=0)
    llm = LLM(path, max_model_len=4096 if args.workload else 1024, max_num_seqs=args.rows)
    runner = llm.model_runner
    logits = torch.zeros(args.rows, VOCAB)  # made once: filling it each step would be the stub's cost
    runner.forward = lambda inputs: logits[:len(inputs.sampling_seq_ids or ())]
    # the sampler is a few kernel launches on a GPU, not host work: stub it with fixed ids
    runner.sampler = lambda logits, *_: SamplerOutput((torch.arange(len(logits)) * 7) % (VOCAB - 12) + 3, None)
    if args.workload:
        return time_workload(llm, args.workload, args.profile)
    rng = random.Random(0)
    prompts = [[rng.randint(3, VOCAB - 12) for _ in range(64)] for _ in range(args.rows)]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.steps)
    llm.generate(prompts[:8], params, use_tqdm=False)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        runs.append((time.perf_counter() - start) / (args.steps + 1) * 1000)
    import nanovllm
    print(f"{statistics.median(runs):.3f} ms per step host-only, {args.rows} rows "
          f"(runs: {', '.join(f'{r:.3f}' for r in runs)}); package {Path(nanovllm.__file__).parent}")
    if args.profile:
        with cProfile.Profile() as prof:
            llm.generate(prompts, params, use_tqdm=False)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    llm.exit()


def time_workload(llm: LLM, name: str, profile: bool) -> None:
    """The host's seconds for a whole bench.py workload (its requests, ids folded into VOCAB):
    intake, scheduling, step inputs and output bookkeeping, none of it hidden by a device."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import bench
    workload = bench.fit_to_vocab(bench.make_workload(bench.WORKLOADS[name]), VOCAB - 12)
    params = bench.nanovllm_params(workload)
    llm.generate(workload.prompt_token_ids[:8], params[:8], use_tqdm=False)
    with cProfile.Profile() if profile else contextlib.nullcontext() as prof:
        start = time.perf_counter()
        llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    prompt_tokens, output_tokens, requests = workload.totals
    print(f"{name}: {seconds:.2f} s host-only for {requests} requests, {prompt_tokens:,} prompt and "
          f"{output_tokens:,} output tokens")
    if profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    llm.exit()


if __name__ == "__main__":
    main()
