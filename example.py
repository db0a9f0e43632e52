"""Generate a few completions with nanovllm.

    python example.py                                   # the embedded demo model, built-in chat prompts
    python example.py --model qwen3 --device cuda --max-tokens 128
    python example.py --model /path/to/hf-model-dir "Tell me a joke." "What is 2 + 2?"
    python example.py --json-schema person.json "Alice is 30 and lives in Paris."   # one JSON object each

--model takes an HF model directory, a hub id (downloaded when a network exists), or an alias
(qwen3 = Qwen/Qwen3-0.6B; demo = the embedded demo model).
"""
import argparse
import json
import os
import sys
import time

MODEL_ALIASES = {"qwen3": "Qwen/Qwen3-0.6B"}
# Where the nano-vLLM examples keep their checkpoints: used for an alias before trying the hub.
LOCAL_MODEL_ROOT = os.path.expanduser("~/huggingface")
DEMO_MODEL = "demo"  # passed through to LLM, which knows it
DEFAULT_PROMPTS = ["introduce yourself", "list all prime numbers within 100", "What is the capital of France?"]
USAGE_HINT = "pass --model /path/to/hf-model-dir (or a hub id such as Qwen/Qwen3-0.6B with network access)"


class ModelUnavailable(Exception):
    """The model can't be found or loaded; main() turns it into one line on stderr and exit code 2."""


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def resolve_model(name: str) -> str:
    """An alias, a local directory or a hub id -> something LLM() accepts."""
    if name == DEMO_MODEL:
        return name
    name = MODEL_ALIASES.get(name, name)
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if not looks_like_hub_id(name):
        raise ModelUnavailable(f"no model directory at {name!r}")
    local = os.path.join(LOCAL_MODEL_ROOT, name.split("/")[1])  # e.g. ~/huggingface/Qwen3-0.6B
    if os.path.isfile(os.path.join(local, "config.json")):
        return local
    return download(name)


def download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        # Returns the cached snapshot when offline and the model was downloaded before.
        return snapshot_download(repo_id)
    except Exception as e:  # no network, unknown or gated repo, no huggingface_hub...
        raise ModelUnavailable(f"cannot download {repo_id!r} from the Hugging Face hub, "
                               f"and it is not cached ({type(e).__name__})") from e


def load_llm(model: str, args):
    from nanovllm import LLM
    config = {"tensor_parallel_size": args.tp}
    if args.device is not None:
        config["device"] = args.device
    try:
        return LLM(model, **config)
    except (FileNotFoundError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelUnavailable(f"cannot load model {model!r} ({reason})") from e


def parse_args(argv=None):
    # NOTE: only the standard library is imported before this runs, so --help is instant
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompts (default: a few built-in chat prompts)")
    p.add_argument("--model", default=DEMO_MODEL,
                   help="HF model dir, hub id, or alias: qwen3, demo (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=128,
                   help="tokens to generate per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (default: %(default)s)")
    p.add_argument("--json-schema", metavar="FILE", help="constrain each completion to a JSON document valid "
                                                        "against this JSON Schema (needs xgrammar)")
    args = p.parse_args(argv)
    if args.json_schema is not None:
        try:
            with open(args.json_schema) as f:
                args.json_schema = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--json-schema {args.json_schema}: {e}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.tp < 1:
        p.error(f"--tp must be >= 1, got {args.tp}")
    return args


def describe(llm, requested: str) -> str:
    """Which model was loaded and how it runs: a path that resolved elsewhere is visible."""
    info = llm.engine_info()
    return (f"Model: {llm.config.model}" + (f" (from {requested!r})" if requested != llm.config.model else "")
            + f"\nDevice: {info['device']}, dtype: {info['dtype']}, attention backend: {info['attention_backend']}, "
            f"KV cache: {info['kv_cache_tokens']} tokens ({info['kv_cache_dtype']})")


def run(llm, args):
    from nanovllm import SamplingParams
    prompts = args.prompts or DEFAULT_PROMPTS
    constraint = None if args.json_schema is None else {"json": args.json_schema}
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, structured_outputs=constraint)
    start = time.perf_counter()
    if getattr(llm.tokenizer, "chat_template", None):  # a chat model: each prompt is one user turn
        # NOTE: a template ignores variables it does not use: enable_thinking is Qwen3's (off here)
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                           chat_template_kwargs={"enable_thinking": False})
    else:
        outputs = llm.generate(prompts, params)  # returns once the tokens are on the host
    seconds = time.perf_counter() - start
    for prompt, output in zip(prompts, outputs):
        print(f"\nPrompt: {prompt!r}\nCompletion: {output['text']!r}")
    num_tokens = sum(len(o["token_ids"]) for o in outputs)
    print(f"\nOutput tokens: {num_tokens}, Time: {seconds:.2f}s, Throughput: {num_tokens / seconds:.2f}tok/s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("example.py: --device cuda, but no CUDA GPU is available; pass --device cpu", file=sys.stderr)
            return 2
    try:
        llm = load_llm(resolve_model(args.model), args)
    except ModelUnavailable as e:
        print(f"example.py: {e}; {USAGE_HINT}", file=sys.stderr)
        return 2
    print(describe(llm, args.model))
    try:
        run(llm, args)
    finally:
        llm.exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
