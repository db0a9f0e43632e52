"""Files in, files out: `python -m nanovllm.batch --model M --input prompts.jsonl --output out/`.

Reads JSONL or Parquet (by extension) through Ray Data and runs `--replicas` engines of
`--tp` GPUs each (`nanovllm.integrations.ray.predict`). Without Ray installed (or with
`--no-ray`) the same job runs in this process with one engine, reading JSONL with the json
module (Parquet needs pyarrow).

Rows: a `prompt` column (strings) or `token_ids` (int lists), or `--prompt-column`;
optional per-row `max_tokens` / `temperature` / `seed`; every column is kept and
`generated_text`, `generated_token_ids`, `finish_reason` are added, rows in input order.
Output: one file, written by this process as results stream in: the path itself when it ends
in `.jsonl` / `.parquet`, else `<path>/part-00000.<--format>` (default parquet).
"""
import argparse
import collections
import json
import math
import os
import sys
import time

import numpy as np

from nanovllm.integrations.columns import requests_from_batch, sampling_params_from, with_outputs

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from nanovllm.integrations.ray import DEFAULT_BATCH_SIZE, DEFAULT_MAX_CONCURRENT_BATCHES

    p = argparse.ArgumentParser(prog="python -m nanovllm.batch", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (or anything LLM(...) takes)")
    p.add_argument("--input", required=True, help="a .jsonl / .parquet file or a directory of them")
    p.add_argument("--output", required=True, help="a .jsonl / .parquet file, or a directory")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())),
                   help="output format (default: the output's extension, else parquet)")
    p.add_argument("--replicas", type=int, default=1, help="engines (Ray actors)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: GPUs per engine")
    p.add_argument("--max-tokens", type=int, help="default max_tokens (a max_tokens column overrides it)")
    p.add_argument("--temperature", type=float, help="default temperature (0 = greedy)")
    p.add_argument("--sampling-params", type=_json_object, default={}, metavar="JSON",
                   help="other SamplingParams fields, e.g. '{\"top_p\": 0.9}'")
    p.add_argument("--engine-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="LLM(...) keywords, e.g. '{\"max_model_len\": 8192}'")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per batch")
    p.add_argument("--max-concurrent-batches", type=int, default=DEFAULT_MAX_CONCURRENT_BATCHES,
                   help="batches in one engine at once (the next joins before the last drains)")
    p.add_argument("--prompt-column", help="default: prompt, else token_ids")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--no-ray", action="store_true", help="run in this process with one engine")
    args = p.parse_args(argv)
    for name in ("replicas", "tp", "batch_size", "max_concurrent_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {**args.sampling_params}
    for name in ("max_tokens", "temperature"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    sampling_params = sampling_params_from(params)  # validated before any engine starts
    llm_kwargs = {**args.engine_kwargs, "tensor_parallel_size": args.tp}
    in_format = input_format(args.input)
    out_format = output_format(args.output, args.format)
    if "parquet" in (in_format, out_format):
        _import_pyarrow()  # fail before any engine starts
    ray = None if args.no_ray else _import_ray()
    if ray is not None and not ray.is_initialized():
        ray.init(address=args.address)
    start = time.perf_counter()
    if ray is not None:
        num_rows = run_on_ray(ray, args, sampling_params, llm_kwargs, in_format, out_format)
    else:
        if args.replicas > 1:
            print(f"nanovllm.batch: --replicas {args.replicas} needs Ray; running one engine", file=sys.stderr)
        num_rows = run_in_process(args, sampling_params, llm_kwargs, in_format, out_format)
    elapsed = time.perf_counter() - start
    print(f"nanovllm.batch: {num_rows} rows in {elapsed:.1f} s ({num_rows / elapsed:.1f} rows/s, engines "
          f"started included) -> {args.output}", file=sys.stderr)
    return 0


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        print(f"nanovllm.batch: Ray is not available ({e}); running in this process with one engine. "
              f"Install it with: pip install -e \".[ray]\"", file=sys.stderr)
        return None
    return ray


# ---- formats -----------------------------------------------------------------------------
def input_format(path: str) -> str:
    """The format of a file, or of the files in a directory (all of one kind)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path!r}")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [path]
    kinds = {FORMATS[ext] for ext in (os.path.splitext(name)[1].lower() for name in names) if ext in FORMATS}
    if len(kinds) != 1:
        raise ValueError(f"input {path!r}: expected .jsonl or .parquet files (one kind), found "
                         f"{sorted(kinds) or 'neither'}")
    return kinds.pop()


def output_format(path: str, flag: str | None) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in FORMATS and flag is not None and FORMATS[ext] != flag:
        raise ValueError(f"--format {flag} contradicts the output's extension {ext!r}")
    return FORMATS.get(ext, flag or "parquet")


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
        raise ImportError('Parquet needs pyarrow: pip install pyarrow (or pip install -e ".[ray]")') from e
    return pyarrow


# ---- on Ray ------------------------------------------------------------------------------
def run_on_ray(ray, args, sampling_params, llm_kwargs: dict, in_format: str, out_format: str) -> int:
    from nanovllm.integrations.ray import predict

    ctx = ray.data.DataContext.get_current()
    preserve_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # NOTE: output row i is input row i
    try:
        ds = ray.data.read_json(args.input) if in_format == "jsonl" else ray.data.read_parquet(args.input)
        ds = _split_blocks(ds, args).materialize()
        ds = predict(ds, args.model, sampling_params=sampling_params, prompt_column=args.prompt_column,
                     replicas=args.replicas, batch_size=args.batch_size,
                     max_concurrent_batches=args.max_concurrent_batches, batch_format="pyarrow", **llm_kwargs)
        with _FileWriter(output_file(args.output, out_format), out_format) as writer:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write_table(table)
            return writer.num_rows
    finally:
        ctx.execution_options.preserve_order = preserve_order


def _split_blocks(ds, args):
    """Blocks of about one batch, so that every replica gets work even from one input file.

    NOTE: the caller materializes the result before the engines start: prompts are small, and
    read or repartition tasks waiting for a CPU that engine actors hold would never run (on a
    CPU-only cluster the engines take every core)."""
    num_blocks = max(args.replicas * args.max_concurrent_batches, math.ceil(ds.count() / args.batch_size))
    return ds.repartition(num_blocks)


# ---- in this process ---------------------------------------------------------------------
def run_in_process(args, sampling_params, llm_kwargs: dict, in_format: str, out_format: str) -> int:
    """One engine, fed as a Ray actor's is: `--max-concurrent-batches` batches in it at once."""
    from tqdm.auto import tqdm

    from nanovllm.integrations.ray import EngineLoop

    rows = _read_rows(args.input, in_format)
    batches = [_rows_to_batch(rows[i:i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    engine = EngineLoop(args.model, llm_kwargs)
    pending = collections.deque()  # (batch, future) in input order
    try:
        with _FileWriter(output_file(args.output, out_format), out_format) as writer, \
                tqdm(total=len(rows), desc="Rows", unit="row") as bar:
            def write_oldest():
                batch, future = pending.popleft()
                outputs = future.result()
                writer.write_rows(_batch_to_rows(with_outputs(batch, outputs)))
                bar.update(len(outputs))

            for batch in batches:
                if len(pending) == args.max_concurrent_batches:
                    write_oldest()
                prompts, params = requests_from_batch(batch, sampling_params, args.prompt_column)
                pending.append((batch, engine.submit(prompts, params)))
            while pending:
                write_oldest()
            return writer.num_rows
    finally:
        engine.close()


def _read_rows(path: str, in_format: str) -> list[dict]:
    rows = []
    for file in _input_files(path):
        if in_format == "parquet":
            rows += _import_pyarrow().parquet.read_table(file).to_pylist()
            continue
        with open(file) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{file}:{line_number}: expected a JSON object per line, got "
                                     f"{type(row).__name__}")
                rows.append(row)
    return rows


def _rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(name for row in rows for name in row))  # every key, first-seen order
    batch = {}
    for name in names:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):  # NOTE: one by one: equal-length lists would become a 2-D array
            column[i] = row.get(name)
        batch[name] = column
    return batch


def _batch_to_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    num_rows = len(next(iter(batch.values())))
    return [{name: _python(values[i]) for name, values in batch.items()} for i in range(num_rows)]


def _python(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


class _FileWriter:
    """Rows (dicts) or Arrow tables into one file. JSONL is written line by line as results
    come; Parquet at the end, as one table whose schema covers every batch (a column that is
    all null in one batch takes its type from the others)."""

    def __init__(self, path: str, out_format: str):
        self.path, self.format = path, out_format
        self.num_rows = 0
        self._file = None
        self._tables = []  # Parquet: Arrow tables, or lists of rows

    def __enter__(self) -> "_FileWriter":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.format == "jsonl":
            self._file = open(self.path, "w")
        return self

    def write_rows(self, rows: list[dict]) -> None:
        if self.format == "jsonl":
            self._file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            self._tables.append(rows)
        self.num_rows += len(rows)

    def write_table(self, table) -> None:
        if self.format == "jsonl":
            self.write_rows(table.to_pylist())
        else:
            self._tables.append(table)
            self.num_rows += table.num_rows

    def __exit__(self, exc_type, *exc) -> None:
        if self._file:
            self._file.close()
        elif exc_type is None:
            pa = _import_pyarrow()
            tables = [t if isinstance(t, pa.Table) else pa.Table.from_pylist(t) for t in self._tables]
            try:
                table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
            except TypeError:  # pyarrow < 14
                table = pa.concat_tables(tables, promote=True)
            pa.parquet.write_table(table, self.path)


if __name__ == "__main__":
    sys.exit(main())
