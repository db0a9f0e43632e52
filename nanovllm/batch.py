"""Files in, files out: `python -m nanovllm.batch --model M --input prompts.jsonl --output out/`.

Two input formats (`--input-format`, default auto: openai when every JSON line has `custom_id`
and `body`):
- rows: JSONL or Parquet rows with a `prompt` (a string) or `token_ids` (a list of ints), or
  `--prompt-column`; optional per-row `max_tokens` / `temperature` / `seed`. Each row is written
  back with `generated_text`, `generated_token_ids`, `finish_reason` added. Every row is checked
  before the model loads; a bad one stops the job (exit code 2, no output file).
- openai: OpenAI Batch API JSONL (`/v1/chat/completions`, `/v1/completions`), written back as
  OpenAI batch output lines; a bad line gets an error line (status 400) and the others run.

Runs `--replicas` engines of `--tp` GPUs each on Ray Data, or one engine in this process
without Ray (or with `--no-ray`); both write the same file, in input order. Output: the path
itself when it ends in `.jsonl` / `.parquet`, else `<path>/part-00000.<--format>`; written under
a temporary name and renamed when the job succeeds (a failed or SIGTERMed job leaves no file).
Columns a row carries through must fit the output format, checked before the model loads; in
JSONL, Parquet dates and times are written as ISO 8601 strings and decimals as strings.
"""
import argparse
import builtins
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from nanovllm.integrations.batch_job import UsageError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# what an engine raises when the model's files, --engine-kwargs or the machine cannot start it
# (a RuntimeError: no memory left for the KV cache): one line, exit code 2; others are bugs
START_ERRORS = (OSError, RuntimeError, TypeError, ValueError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # NOTE: nothing heavy is imported before the arguments are parsed: --help answers at once
    from nanovllm.integrations.columns import DEFAULT_BATCH_SIZE, DEFAULT_MAX_CONCURRENT_BATCHES

    p = argparse.ArgumentParser(prog="python -m nanovllm.batch", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory, a .gguf file, or demo")
    p.add_argument("--input", required=True, help="a .jsonl / .parquet file or a directory of them")
    p.add_argument("--output", required=True, help="a .jsonl / .parquet file, or a directory")
    p.add_argument("--input-format", choices=("auto", "rows", "openai"), default="auto",
                   help="auto: openai when every line has custom_id and body")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())),
                   help="output format (None: the output's extension, else parquet for rows, jsonl for openai)")
    p.add_argument("--replicas", type=int, default=1, help="engines (Ray actors)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: GPUs per engine")
    p.add_argument("--max-tokens", type=int, help="default max_tokens (None: SamplingParams' 64); a row's or a request's own wins")
    p.add_argument("--temperature", type=float, help="default temperature, 0 = greedy (None: SamplingParams' 1.0)")
    p.add_argument("--sampling-params", type=_json_object, default={}, metavar="JSON",
                   help="other default SamplingParams fields, e.g. '{\"top_p\": 0.9}'")
    p.add_argument("--engine-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="LLM(...) keywords, e.g. '{\"max_model_len\": 8192}' (tensor_parallel_size: --tp)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per batch")
    p.add_argument("--max-concurrent-batches", type=int, default=DEFAULT_MAX_CONCURRENT_BATCHES,
                   help="batches in one engine at once (the next joins before the last drains)")
    p.add_argument("--prompt-column", help="rows: the prompt column (None: prompt, else token_ids)")
    p.add_argument("--address", help="Ray cluster address (None: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--no-ray", action="store_true", help="run in this process with one engine")
    p.add_argument("--verbose", action="store_true", help="Ray's start-up and worker logs (quiet by default)")
    args = p.parse_args(argv)
    for name in ("replicas", "tp", "batch_size", "max_concurrent_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "tensor_parallel_size" in args.engine_kwargs:  # NOTE: --tp also sizes each Ray actor's GPUs
        p.error("--engine-kwargs: give tensor_parallel_size with --tp instead")
    return args


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default shown (required ones have none), the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.required else super()._get_help_string(action)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r:.200}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"nanovllm.batch: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Check everything the job needs (input, output, model, parameters), then run it."""
    from nanovllm.integrations import batch_job

    in_format = input_format(args.input)
    if in_format == "parquet":
        _import_pyarrow()
    files = _input_files(args.input)
    lines = batch_job.read_lines(files, in_format)
    kind = batch_job.detect_format(lines, args.input_format, in_format)
    out_format = output_format(args.output, args.format, kind)
    if out_format == "parquet":
        _import_pyarrow()
    path = output_file(args.output, out_format)
    _check_not_an_input(path, files)
    base = _base_params(args)
    model_dir = _check_model(args.model, {**args.engine_kwargs, "tensor_parallel_size": args.tp})
    job = (batch_job.openai_job(lines, base, model_dir, args.model) if kind == "openai"
           else batch_job.rows_job(lines, base, args.prompt_column))
    if kind == "rows":
        batch_job.check_writable([line.value for line in lines], out_format)
    start, results = time.perf_counter(), None
    try:
        with batch_job.AtomicWriter(path, out_format) as writer:  # NOTE: checks the path before any work
            results = run_requests(args, job.requests) if job.requests else None
            summary = job.write(results or (), writer)
    finally:
        if results is not None:
            results.close()  # NOTE: stops the engines now, not when the generator is collected
    print(f"nanovllm.batch: {summary} in {time.perf_counter() - start:.1f} s (engines started included) "
          f"-> {path}", file=sys.stderr)
    return 0


def _check_not_an_input(path: str, files: list[str]) -> None:
    if os.path.exists(path) and any(os.path.samefile(path, file) for file in files):
        raise UsageError(f"--output {path} is an input file: the results would overwrite it")


def _base_params(args) -> dict:
    """The job's default SamplingParams fields, checked now."""
    from nanovllm.integrations.columns import sampling_params_from

    params = {**args.sampling_params}
    for name in ("max_tokens", "temperature"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    try:
        sampling_params_from({k: v for k, v in params.items() if k != "n"})
    except (TypeError, ValueError) as e:
        raise UsageError(f"--sampling-params / --max-tokens / --temperature: {e}") from e
    return params


def _check_model(model: str, llm_kwargs: dict) -> str:
    """The model's HF directory, found and its config read, without loading the model."""
    from nanovllm.config import Config, read_hf_config
    from nanovllm.utils.model_path import resolve_model_path

    try:
        path = resolve_model_path(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such model directory or file: {model!r}")
        read_hf_config(path)
        Config.from_kwargs(path, **llm_kwargs)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise UsageError(f"--model {model} (--engine-kwargs, --tp): {e}") from e
    return path


# ---- formats -----------------------------------------------------------------------------
def input_format(path: str) -> str:
    """The format of a file, or of the files in a directory (all of one kind)."""
    if not os.path.exists(path):
        raise UsageError(f"input not found: {path!r}")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [path]
    kinds = {FORMATS[ext] for ext in (os.path.splitext(name)[1].lower() for name in names) if ext in FORMATS}
    if len(kinds) != 1:
        raise UsageError(f"input {path!r}: expected .jsonl or .parquet files (one kind), found "
                         f"{sorted(kinds) or 'neither'}")
    return kinds.pop()


def output_format(path: str, flag: str | None, kind: str = "rows") -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in FORMATS and flag is not None and FORMATS[ext] != flag:
        raise UsageError(f"--format {flag} contradicts the output's extension {ext!r}")
    out = FORMATS.get(ext, flag or ("jsonl" if kind == "openai" else "parquet"))
    if kind == "openai" and out != "jsonl":
        raise UsageError("OpenAI batch files are written as JSONL: use a .jsonl output (or --format jsonl)")
    return out


def output_file(path: str, out_format: str) -> str:
    """The one file written: `path` itself if it has an extension, else `path/part-00000.<format>`."""
    if os.path.splitext(path)[1].lower() in FORMATS:
        return path
    return os.path.join(path, f"part-00000.{out_format}")


def _input_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(path, name) for name in sorted(os.listdir(path))
            if os.path.splitext(name)[1].lower() in FORMATS]


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise UsageError('Parquet needs pyarrow: pip install pyarrow (or pip install -e ".[ray]")') from e
    return pyarrow


# ---- running requests: on Ray, or in this process ----------------------------------------
@dataclass(frozen=True)
class _Engines:
    model: str
    llm_kwargs: dict
    replicas: int
    batch_size: int
    max_concurrent_batches: int


def run_requests(args, requests: list[str]):
    """Encoded requests (`request_rows.encode_request`) -> their results, in order, as they come."""
    engines = _Engines(args.model, {**args.engine_kwargs, "tensor_parallel_size": args.tp}, args.replicas,
                       args.batch_size, args.max_concurrent_batches)
    ray = None if args.no_ray else _import_ray()
    if ray is None:
        if args.replicas > 1:
            print(f"nanovllm.batch: --replicas {args.replicas} needs Ray; running one engine", file=sys.stderr)
        return _in_process(engines, requests)
    from nanovllm.integrations.ray import init_ray
    # NOTE: an engine that fails to start is reported once, as one line (`_on_ray`), not also in the
    # pages of Ray's task-retry and Ray Data error logs
    if not args.verbose:
        os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    init_ray(args.address, verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return _on_ray(ray, engines, requests)  # NOTE: a generator, closed by the caller


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        print(f"nanovllm.batch: Ray is not available ({e}); running in this process with one engine. "
              f"Install it with: pip install -e \".[ray]\"", file=sys.stderr)
        return None
    return ray


def _on_ray(ray, engines: _Engines, requests: list[str]):
    import math

    from nanovllm.integrations.ray import predict
    from nanovllm.integrations.request_rows import REQUEST_COLUMN, RESULT_COLUMN, RequestPredictor

    ctx = ray.data.DataContext.get_current()
    preserve_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # NOTE: output row i is input row i
    try:
        # Blocks of about one batch, so that every replica gets work. NOTE: materialized before the
        # engines start: tasks waiting for a CPU that engine actors hold would never run
        num_blocks = max(engines.replicas * engines.max_concurrent_batches,
                         math.ceil(len(requests) / engines.batch_size))
        ds = ray.data.from_items([{REQUEST_COLUMN: r} for r in requests]).repartition(num_blocks).materialize()
        ds = predict(ds, engines.model, replicas=engines.replicas, batch_size=engines.batch_size,
                     max_concurrent_batches=engines.max_concurrent_batches, batch_format="pyarrow",
                     predictor=RequestPredictor, **engines.llm_kwargs)
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from table.column(RESULT_COLUMN).to_pylist()
    except ray.exceptions.RayActorError as e:
        message = _start_error(e)
        if message is None:
            raise
        raise UsageError(f"--model {engines.model}: the engine did not start: {message}") from e
    finally:
        ctx.execution_options.preserve_order = preserve_order


def _start_error(error) -> str | None:
    """The message of the START_ERRORS exception an actor's engine raised while starting, else None.
    Ray keeps only its text: a traceback whose last line reads `ValueError: message`."""
    if not error.actor_init_failed:
        return None
    name, _, message = str(error).strip().splitlines()[-1].partition(": ")
    cls = getattr(builtins, name, None)
    return message if isinstance(cls, type) and issubclass(cls, START_ERRORS) else None


def _in_process(engines: _Engines, requests: list[str]):
    """One engine, fed as a Ray actor's is: `max_concurrent_batches` batches in it at once."""
    import collections

    from tqdm.auto import tqdm

    from nanovllm.integrations.ray import EngineLoop
    from nanovllm.integrations.request_rows import submit_rows

    try:
        engine = EngineLoop(engines.model, engines.llm_kwargs)
    except START_ERRORS as e:
        raise UsageError(f"--model {engines.model}: the engine did not start: {e}") from e
    pending = collections.deque()  # futures, in input order
    try:
        with tqdm(total=len(requests), desc="Requests", unit="req") as bar:
            for i in range(0, len(requests), engines.batch_size):
                if len(pending) == engines.max_concurrent_batches:
                    results = pending.popleft().result()
                    bar.update(len(results))
                    yield from results
                pending.append(submit_rows(engine, requests[i:i + engines.batch_size]))
            while pending:
                results = pending.popleft().result()
                bar.update(len(results))
                yield from results
    finally:
        engine.close()


def _exit_on_sigterm(signum: int, frame) -> None:
    # NOTE: SystemExit unwinds the job as Ctrl-C does: the engines stop, the temporary file goes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
