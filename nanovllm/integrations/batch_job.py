"""The file side of `python -m nanovllm.batch`: read every input line, check it before any
engine starts, turn it into an encoded request (`request_rows`), and write each result back
in the input's format, in input order, into a file renamed into place only when the job succeeds.

Two formats: `rows` (our own columns, `nanovllm.integrations.columns`; a bad row stops the job)
and `openai` (OpenAI Batch API lines, `nanovllm.integrations.openai_batch`; a bad line gets an
error line and the others run)."""
import datetime
import decimal
import io
import json
import os
import sys
from dataclasses import dataclass, field

from nanovllm.integrations.openai_batch import LineError

MAX_LISTED_ERRORS = 5


class UsageError(Exception):
    """A user mistake: one line on stderr and exit code 2 (a traceback is kept for bugs)."""


@dataclass(frozen=True)
class InputLine:
    where: str      # "file:N" (the 1-based line of a JSONL file) or "file: row N" (Parquet)
    value: object   # the parsed JSON value (a row), or a LineError for a line that is not JSON


def read_lines(files: list[str], in_format: str) -> list[InputLine]:
    lines = []
    for file in files:
        if in_format == "parquet":
            rows = _read_parquet(file)
            lines += [InputLine(f"{file}: row {i}", row) for i, row in enumerate(rows, 1)]
            continue
        try:
            with open(file, encoding="utf-8-sig") as f:  # NOTE: -sig: a UTF-8 BOM at the start is accepted
                lines += [InputLine(f"{file}:{number}", _loads(text)) for number, text in enumerate(f, 1)
                          if text.strip()]
        except UnicodeDecodeError as e:
            raise UsageError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise UsageError(f"input {file}: {e.strerror or e}") from e
    return lines


def _read_parquet(file: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"input {file}: not a readable Parquet file: {e}") from e


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:  # NOTE: one line at a time, so the line number is the file's
        return LineError("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return LineError("invalid_json", "not valid JSON here: nested too deeply to parse")


def detect_format(lines: list[InputLine], flag: str, in_format: str) -> str:
    """`--input-format auto`: openai when every line that parses has custom_id and body."""
    from nanovllm.integrations.openai_batch import is_openai_line

    if flag == "openai" and in_format != "jsonl":
        raise UsageError("--input-format openai reads JSONL files")
    if flag != "auto":
        return flag
    values = [line.value for line in lines if not isinstance(line.value, LineError)]
    return "openai" if in_format == "jsonl" and values and all(map(is_openai_line, values)) else "rows"


def _check_all(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more bad {what}s)" if len(problems) > 1 else ""
        listed = "; ".join(problems[1:MAX_LISTED_ERRORS])
        raise UsageError(f"{problems[0]}{more}{': ' + listed if listed else ''}")


# ---- rows --------------------------------------------------------------------------------
@dataclass
class RowsJob:
    lines: list[InputLine]
    requests: list[str]

    def write(self, results, writer: "AtomicWriter") -> str:
        from nanovllm.integrations.request_rows import decode_result

        for line, result in zip(self.lines, results):
            out = decode_result(result)
            if "error" in out:
                raise UsageError(f"{line.where}: {out['error']}")
            # NOTE: the row as read, so a key a row lacks stays absent (no null columns in JSONL)
            writer.write({**line.value, "generated_text": out["text"], "generated_token_ids": out["token_ids"],
                          "finish_reason": out["finish_reason"]})
        return f"{len(self.lines)} rows"


def rows_job(lines: list[InputLine], base: dict, prompt_column: str | None) -> RowsJob:
    """Every row checked (prompt, per-row sampling fields) before any engine starts."""
    from nanovllm.integrations.columns import row_request, sampling_params_from
    from nanovllm.integrations.request_rows import encode_request

    requests, problems = [], []
    for line in lines:
        try:
            if isinstance(line.value, LineError):
                raise line.value
            if not isinstance(line.value, dict):
                raise ValueError(f"expected a JSON object per line, got {type(line.value).__name__}")
            prompt, overrides = row_request(line.value, prompt_column)
            params = {**base, **overrides}
            sampling_params_from(params)
            requests.append(encode_request(prompt, params))
        except (TypeError, ValueError) as e:
            problems.append(f"{line.where}: {e}")
    _check_all(problems, "row")
    return RowsJob(lines, requests)


def check_writable(rows: list[dict], out_format: str) -> None:
    """Every column the rows carry through can be written in `out_format`: found now, not after
    every row has been generated. Each column is converted as the output file converts it."""
    for name, values in _columns(rows).items():
        try:
            if out_format == "parquet":
                _write_parquet({name: values}, io.BytesIO())
            else:
                json.dumps(values, default=json_value)
        # NOTE: pyarrow's errors are these too (ArrowInvalid is a ValueError, ArrowTypeError a TypeError)
        except (NotImplementedError, OverflowError, TypeError, ValueError) as e:
            other = "jsonl" if out_format == "parquet" else "parquet"
            raise UsageError(f"column {name!r} cannot be written to {out_format} ({e}); write {other} "
                             f"instead (a .{other} output or --format {other})") from e


def json_value(value: object) -> str:
    """JSONL output of values JSON has no type for (Parquet input), written losslessly as strings:
    dates and times in ISO 8601, decimals as written. Anything else (bytes) is a TypeError."""
    if isinstance(value, (datetime.date, datetime.time)):  # NOTE: a datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"JSON cannot hold {type(value).__name__} values")


def _columns(rows: list[dict]) -> dict[str, list]:
    """Every key, in first-seen order -> its value in every row (None where a row lacks it)."""
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def _write_parquet(columns: dict[str, list], file) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), file)


# ---- OpenAI batch files ------------------------------------------------------------------
@dataclass
class OpenAIJob:
    lines: list[InputLine]
    parsed: list   # per line: an OpenAIRequest, or the LineError that keeps it from running
    requests: list[str]
    tokenizer: object
    info: object   # openai_batch.JobInfo
    counts: dict = field(default_factory=lambda: {"succeeded": 0, "failed": 0})

    def write(self, results, writer: "AtomicWriter") -> str:
        from nanovllm.integrations import openai_batch as oa
        from nanovllm.integrations.request_rows import decode_result

        results = iter(results)
        for index, (line, item) in enumerate(zip(self.lines, self.parsed)):
            if not isinstance(item, LineError):
                result = decode_result(next(results))
                if "error" not in result:
                    self.counts["succeeded"] += 1
                    writer.write(oa.response_line(index, item, result, self.info, self.tokenizer))
                    continue
                item = LineError("invalid_request", result["error"])
            self.counts["failed"] += 1
            custom_id = line.value.get("custom_id") if isinstance(line.value, dict) else None
            writer.write(oa.error_line(index, custom_id, item))
            if self.counts["failed"] <= MAX_LISTED_ERRORS:
                print(f"nanovllm.batch: {line.where}: {item.code}: {item}", file=sys.stderr)
        return f"{len(self.lines)} lines: {self.counts['succeeded']} succeeded, {self.counts['failed']} failed"


def openai_job(lines: list[InputLine], base: dict, model_dir: str, model: str) -> OpenAIJob:
    """Every line parsed and checked (its chat template applied) before any engine starts."""
    import time

    from transformers import AutoTokenizer

    from nanovllm.integrations import openai_batch as oa
    from nanovllm.integrations.request_rows import encode_request

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parsed, requests, first_seen, models = [], [], {}, set()
    for line in lines:
        try:
            if isinstance(line.value, LineError):
                raise line.value
            request = oa.parse_line(line.value, base, tokenizer)
            if request.custom_id in first_seen:
                raise LineError("duplicate_custom_id", f"custom_id {request.custom_id!r} is also on "
                                                       f"{first_seen[request.custom_id]}")
            first_seen[request.custom_id] = line.where
            models.add(str(line.value["body"].get("model")))
            requests.append(encode_request(request.prompt, request.sampling_params))
            parsed.append(request)
        except LineError as e:
            parsed.append(e)
    models.discard("None")
    if models:
        print(f"nanovllm.batch: note: body.model ({', '.join(sorted(models))}) is ignored: every line runs on "
              f"--model {model}", file=sys.stderr)
    return OpenAIJob(lines, parsed, requests, tokenizer, oa.JobInfo(model, int(time.time())))


# ---- the output file ---------------------------------------------------------------------
class AtomicWriter:
    """Rows (dicts) into one JSONL or Parquet file, written under a temporary name in the same
    folder and renamed to `path` only when the job succeeds: a failed job leaves no partial file."""

    def __init__(self, path: str, out_format: str):
        self.path, self.format = path, out_format
        folder, name = os.path.split(os.path.abspath(path))
        self._tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        self._file = None
        self._rows: list[dict] = []   # Parquet: written at the end, as one table

    def __enter__(self) -> "AtomicWriter":
        # NOTE: the file is created now, before any engine starts: a path that cannot be written is
        # a usage error, not work lost at the end
        if os.path.isdir(self.path):
            raise UsageError(f"--output {self.path} is a directory: give a path without an extension "
                             f"to write into it")
        try:
            os.makedirs(os.path.dirname(self._tmp), exist_ok=True)
            self._file = open(self._tmp, "w", encoding="utf-8") if self.format == "jsonl" else open(self._tmp, "wb")
        except OSError as e:
            raise UsageError(f"--output {self.path}: cannot write there: {e}") from e
        return self

    def write(self, row: dict) -> None:
        if self.format == "jsonl":
            self._file.write(json.dumps(row, ensure_ascii=False, default=json_value) + "\n")
        else:
            self._rows.append(row)

    def __exit__(self, exc_type, *exc) -> None:
        try:
            with self._file:  # NOTE: closed (flushed) before the rename, and when the write fails too
                if exc_type is None and self.format == "parquet":
                    _write_parquet(_columns(self._rows), self._file)
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
