"""The host's per-step cost of structured outputs: advancing every row's matcher by one token
and filling the step's bitmask. The engine does both while the device runs the step's
forward, so the device idles only when this exceeds a forward pass; compare it with the
step time of `python bench.py` at the same batch size.

    python benchmarks/structured_host_cost.py --tokenizer <HF model dir> --rows 256 --steps 64
    python benchmarks/structured_host_cost.py            # the demo model's tokenizer (49,152 ids)

The rows walk random paths through the schema's grammar (a random allowed token each step)."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package

from nanovllm.engine.sequence import Sequence, SequenceStatus  # noqa: E402
from nanovllm.engine.structured_output import GrammarManager  # noqa: E402
from nanovllm.layers.grammar_mask import unpack_bitmask  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402
from nanovllm.utils.model_path import resolve_model_path  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="demo", help="an HF model directory, or demo")
    p.add_argument("--vocab-size", type=int, help="the logits' width (default: the tokenizer's length)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="*", default=[0],
                   help="xgrammar's fill threads, one run each (0: its default, half the cores)")
    p.add_argument("--min-length", type=int, default=0, help="the schema's strings' minLength (bench.py's "
                   "--structured json sets max_tokens x the longest token)")
    args = p.parse_args()
    if args.min_length:
        for field in ("name", "email"):
            SCHEMA["properties"][field]["minLength"] = args.min_length
    for threads in args.threads:
        run(args, threads)


def run(args: argparse.Namespace, threads: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
    vocab = args.vocab_size or len(tokenizer)
    grammars = GrammarManager(tokenizer, vocab, frozenset({tokenizer.eos_token_id}))
    params = SamplingParams(max_tokens=args.steps + 1, structured_outputs=dict(json=SCHEMA))
    grammars.check(0, params)
    if threads:
        grammars._batch_matcher = grammars._xgr.BatchGrammarMatcher(max_threads=threads)
    seqs = [Sequence([0], params) for _ in range(args.rows)]
    generator = torch.Generator().manual_seed(0)
    fill_ms, advance_ms = [], []
    for _ in range(args.steps):
        live = [s for s in seqs if not s.is_finished]
        start = time.perf_counter()
        mask = grammars.fill(live)
        fill_ms.append((time.perf_counter() - start) * 1e3)
        allowed = unpack_bitmask(mask.bitmask, vocab)   # [rows, vocab]: pick a random allowed token
        others = allowed.clone()
        others[:, tokenizer.eos_token_id] = False        # EOS only where nothing else is allowed
        allowed = torch.where(others.any(dim=1, keepdim=True), others, allowed)
        # NOTE: one batched draw: a Python pick over each row's ~150k allowed ids took ~10 ms a row
        tokens = torch.multinomial(allowed.float(), 1, generator=generator).flatten().tolist()
        sampled = {}
        for seq, token in zip(live, tokens):
            seq.token_ids.append(token)
            sampled[seq.seq_id] = token
        start = time.perf_counter()
        for seq, _ in grammars.advance(live, sampled):   # its document closed
            seq.status = SequenceStatus.FINISHED
        advance_ms.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"tokenizer": args.tokenizer, "vocab_size": vocab, "rows": args.rows, "steps": args.steps,
                      "torch_threads": torch.get_num_threads(), "fill_threads": threads or "default",
                      "fill_ms_median": round(statistics.median(fill_ms), 3),
                      "advance_ms_median": round(statistics.median(advance_ms), 3)}))


if __name__ == "__main__":
    main()
