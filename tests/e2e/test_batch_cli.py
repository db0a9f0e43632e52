"""`python -m nanovllm.batch`: a JSONL file round trip on a local Ray cluster (2 replicas),
in this process when Ray cannot be imported, and with `--no-ray`; every path writes the
same rows, equal to `LLM.generate` on the same prompts."""
import json
import os
import re
import sys

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm import batch as batch_cli
from tests.conftest import VOCAB
from tests.helpers import random_prompts

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=256)
MAX_TOKENS = 5
PROMPTS = random_prompts([4 + (5 * i) % 29 for i in range(24)], VOCAB, seed=9)


def row(i: int, prompt: list[int]) -> dict:
    """Text prompts with an extra column; every third row sets its own max_tokens."""
    out = {"id": i, "prompt": " ".join(f"t{t}" for t in prompt), "meta": {"source": f"s{i % 3}"}}
    if i % 3 == 0:
        out["max_tokens"] = 2 + i % 4
    return out


ROWS = [row(i, p) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def path(checkpoint) -> str:
    return checkpoint("qwen3")


@pytest.fixture(scope="module")
def expected(path) -> list[dict]:
    llm = LLM(path, **ENGINE)
    try:
        params = [SamplingParams(temperature=0, max_tokens=r.get("max_tokens", MAX_TOKENS)) for r in ROWS]
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.exit()
    # every input key is kept, and a key a row lacks stays absent
    return [{**r, "generated_text": o["text"], "generated_token_ids": o["token_ids"],
             "finish_reason": o["finish_reason"]} for r, o in zip(ROWS, outs)]


@pytest.fixture
def input_file(tmp_path) -> str:
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(file)


def cli(path: str, input_file: str, output: str, *extra: str) -> list[str]:
    return ["--model", path, "--input", input_file, "--output", output, "--temperature", "0",
            "--max-tokens", str(MAX_TOKENS), "--engine-kwargs", json.dumps(ENGINE), "--batch-size", "8", *extra]


def read_jsonl(file: str) -> list[dict]:
    with open(file) as f:
        return [json.loads(line) for line in f]


def test_in_process_when_ray_is_missing(path, input_file, tmp_path, expected, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    output = str(tmp_path / "out.jsonl")
    assert batch_cli.main(cli(path, input_file, output, "--replicas", "2")) == 0
    err = capsys.readouterr().err
    assert "Ray is not available" in err and 'pip install -e ".[ray]"' in err
    assert "--replicas 2 needs Ray" in err
    assert read_jsonl(output) == expected


def test_no_ray_flag_writes_parquet_into_a_directory(path, input_file, tmp_path, expected):
    pq = pytest.importorskip("pyarrow.parquet")
    output = tmp_path / "out"
    assert batch_cli.main(cli(path, input_file, str(output), "--no-ray")) == 0
    assert os.listdir(output) == ["part-00000.parquet"]
    # a column holds every row: a row without max_tokens has null there
    assert pq.read_table(output / "part-00000.parquet").to_pylist() == [{"max_tokens": None, **e} for e in expected]


def test_parquet_without_pyarrow_is_a_clear_error(path, input_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert batch_cli.main(cli(path, input_file, str(tmp_path / "out.parquet"), "--no-ray")) == 2
    assert "error: Parquet needs pyarrow: pip install pyarrow" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--format", "parquet"), "--format parquet contradicts the output's extension '.jsonl'"),
    (("--temperature", "-1"), "temperature must be .*got -1"),
    (("--sampling-params", '{"max_token": 3}'), r"unknown sampling_params field\(s\) \['max_token'\]"),
    (("--engine-kwargs", '{"block_size": 16}'), r"unknown config keyword\(s\) \['block_size'\]"),
])
def test_bad_arguments_are_one_line_errors(path, input_file, tmp_path, capsys, extra, message):
    assert batch_cli.main(cli(path, input_file, str(tmp_path / "o.jsonl"), "--no-ray", *extra)) == 2
    err = capsys.readouterr().err
    assert re.search("^nanovllm.batch: error: .*" + message, err) and err.count("\n") == 1
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["prompts.jsonl"]


def test_bad_paths_are_one_line_errors(path, input_file, tmp_path, capsys):
    assert batch_cli.main(cli(path, str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl"))) == 2
    assert "error: input not found" in capsys.readouterr().err
    assert batch_cli.main(cli(str(tmp_path / "nonexistent"), input_file, str(tmp_path / "o.jsonl"))) == 2
    assert "error: --model " + str(tmp_path / "nonexistent") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        batch_cli.main(cli(path, input_file, str(tmp_path / "o.jsonl"), "--replicas", "0"))


def test_on_ray_two_replicas_round_trip(ray_cluster, path, input_file, tmp_path, expected, capsys):
    output = str(tmp_path / "out.jsonl")
    assert batch_cli.main(cli(path, input_file, output, "--replicas", "2")) == 0
    assert "24 rows in" in capsys.readouterr().err
    assert read_jsonl(output) == expected  # in input order
