"""The column contract of batch jobs, shared by the Ray Data predictor and the in-process
`nanovllm.batch` job: a batch of rows in, the same rows with the generation out.

In: a prompt column (`prompt`, else `token_ids`, or the one named) whose values are strings
or token-id lists, and optional per-row sampling columns (`ROW_PARAM_COLUMNS`) that
override the job's `SamplingParams` where a row has a value (None / NaN: no override).
Out: every input column, plus `OUTPUT_COLUMNS`:
  generated_text (str), generated_token_ids (list[int]), finish_reason ("stop" | "length").
A batch is a dict of numpy arrays (Ray Data's default batch_format="numpy"), a pandas
DataFrame (batch_format="pandas") or a pyarrow Table (batch_format="pyarrow", which passes the
other columns through untouched); the output has the input's type."""
import math
from dataclasses import fields, replace

import numpy as np

from nanovllm.sampling_params import SamplingParams

DEFAULT_PROMPT_COLUMNS = ("prompt", "token_ids")   # the first present is used
# Per-row overrides, where SamplingParams has the field (`seed` arrived with the sampling API).
ROW_PARAM_COLUMNS = tuple(name for name in ("max_tokens", "temperature", "seed")
                          if name in SamplingParams.__dataclass_fields__)
_INT_FIELDS = frozenset({"max_tokens", "seed"})
OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "finish_reason")
# Rows per batch: a few hundred sequences fill a GPU engine's batch (max_num_seqs 512), and
# with two batches in flight per engine the next one is queued before the last one drains.
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_CONCURRENT_BATCHES = 2

Prompt = str | list[int]


def sampling_params_from(value: SamplingParams | dict | None) -> SamplingParams:
    """A job's base params: a SamplingParams, a dict of its fields, or None (the defaults)."""
    if value is None:
        value = SamplingParams()
    elif isinstance(value, dict):
        valid = [f.name for f in fields(SamplingParams)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise TypeError(f"unknown sampling_params field(s) {unknown}; valid ones are {valid}")
        value = SamplingParams(**value)
    elif not isinstance(value, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, a dict of its fields or None, "
                        f"got {type(value).__name__}")
    if value.n != 1:  # one row, one completion: the output columns hold one
        raise ValueError(f"sampling_params.n must be 1 in a batch job (repeat the rows for more samples), "
                         f"got {value.n}")
    return value


def column_names(batch) -> list[str]:
    if isinstance(batch, dict):
        return list(batch)
    kind = _batch_kind(batch)
    return list(batch.column_names) if kind == "pyarrow" else list(batch.columns)


def column_values(batch, name: str):
    """One column's values, row by row (numpy scalars and arrays, or Python values)."""
    if isinstance(batch, dict):
        return batch[name]
    kind = _batch_kind(batch)
    return batch.column(name).to_pylist() if kind == "pyarrow" else batch[name].to_numpy()


def find_prompt_column(columns: list[str], prompt_column: str | None = None) -> str:
    if prompt_column is not None:
        if prompt_column not in columns:
            raise ValueError(f"prompt column {prompt_column!r} is not in the batch; its columns are {list(columns)}")
        return prompt_column
    for name in DEFAULT_PROMPT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"no prompt column: expected one of {list(DEFAULT_PROMPT_COLUMNS)} or prompt_column=...; "
                     f"the batch's columns are {list(columns)}")


def requests_from_batch(batch, base: SamplingParams, prompt_column: str | None = None
                        ) -> tuple[list[Prompt], list[SamplingParams]]:
    """One prompt and one SamplingParams per row, for `LLM.generate`."""
    names = column_names(batch)
    name = find_prompt_column(names, prompt_column)
    prompts = [_prompt(name, i, value) for i, value in enumerate(column_values(batch, name))]
    overrides = {c: column_values(batch, c) for c in ROW_PARAM_COLUMNS if c in names}
    params = [_row_params(base, overrides, i) for i in range(len(prompts))]
    return prompts, params


def with_outputs(batch, outputs: list[dict]):
    """`batch` plus OUTPUT_COLUMNS from `LLM.generate`'s result dicts (one per row, in order)."""
    new = {"generated_text": [out["text"] for out in outputs],
           "generated_token_ids": [list(out["token_ids"]) for out in outputs],
           "finish_reason": [out["finish_reason"] for out in outputs]}
    if isinstance(batch, dict):  # NOTE: a new dict: Ray's zero-copy batches are read-only
        return {**batch, **{name: object_array(values) for name, values in new.items()}}
    if _batch_kind(batch) == "pandas":
        return batch.assign(**{name: object_array(values) for name, values in new.items()})
    import pyarrow as pa  # the batch is a pyarrow Table, so pyarrow is there

    types = {"generated_text": pa.string(), "generated_token_ids": pa.list_(pa.int64()),
             "finish_reason": pa.string()}
    table = batch.drop_columns([name for name in new if name in batch.column_names])
    for name, values in new.items():
        table = table.append_column(name, pa.array(values, type=types[name]))
    return table


def row_request(row: dict, prompt_column: str | None = None) -> tuple[Prompt, dict]:
    """One row read from a file -> its prompt and its per-row SamplingParams overrides; a
    ValueError says what is missing or wrong."""
    names = (prompt_column,) if prompt_column else DEFAULT_PROMPT_COLUMNS
    name = next((n for n in names if row.get(n) is not None), None)
    if name is None:
        raise ValueError(f"no {' or '.join(map(repr, names))} key: every row needs a prompt (a string)"
                         + ("" if prompt_column else " or token_ids (a list of int token ids)"))
    prompt = _as_prompt(row[name])
    if prompt is None:
        raise ValueError(f"{name!r} must be a string or a list of int token ids, got "
                         f"{type(row[name]).__name__}: {row[name]!r:.80}")
    if not prompt:
        raise ValueError(f"{name!r} is empty")
    overrides = {c: value for c in ROW_PARAM_COLUMNS if (value := _scalar(c, row.get(c))) is not None}
    return prompt, overrides


def _prompt(column: str, i: int, value) -> Prompt:
    prompt = _as_prompt(value)
    if prompt is None:
        raise TypeError(f"row {i}: column {column!r} must hold strings or lists of int token ids, "
                        f"got {type(value).__name__}: {value!r:.80}")
    return prompt


def _as_prompt(value) -> Prompt | None:
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):  # a list column arrives from Arrow as an int64 array per row
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(_is_token_id(t) for t in value):
        return [int(t) for t in value]
    return None


def _is_token_id(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def _row_params(base: SamplingParams, columns: dict, i: int) -> SamplingParams:
    overrides = {}
    for name, values in columns.items():
        value = _scalar(name, values[i])
        if value is not None:
            overrides[name] = value
    if not overrides:
        return base
    try:
        return replace(base, **overrides)  # validated again by SamplingParams
    except ValueError as e:
        raise ValueError(f"row {i}: {e}") from e


def _scalar(name: str, value):
    """A Python value for SamplingParams, or None where the row has none (None, NaN, pandas NA)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and math.isnan(value)):
        return None
    # NOTE: an int column with a gap becomes float64 (pandas, Arrow): 16.0 means 16
    if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # NOTE: one by one: equal-length lists would become a 2-D array
        out[i] = value
    return out


def _batch_kind(batch) -> str:
    """"pandas" or "pyarrow", found without importing either (they come with Ray Data)."""
    module, name = type(batch).__module__, type(batch).__name__
    if name == "DataFrame" and module.startswith("pandas"):
        return "pandas"
    if name == "Table" and module.startswith("pyarrow"):
        return "pyarrow"
    raise TypeError(f"a batch must be a dict of numpy arrays (batch_format='numpy'), a pandas DataFrame or a "
                    f"pyarrow Table, got {type(batch).__name__}")
