"""`python -m nanovllm.batch` with rows (our columns): a JSONL file round trip in this process
when Ray cannot be imported, and with `--no-ray`, equal to `LLM.generate` on the same prompts;
user mistakes found before the model loads, as one line and exit code 2, with no output file.
(The engine side is the same for both input formats: test_batch_openai runs it on Ray.)"""
import datetime
import decimal
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if an engine starts: the checks must come before the model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("an engine was started")
    monkeypatch.setattr("nanovllm.integrations.ray.EngineLoop", refuse)


def test_every_bad_row_is_reported_before_the_model_loads(path, tmp_path, capsys, no_engine):
    file = tmp_path / "rows.jsonl"
    lines = ['\ufeff{"prompt": "t5"}', '{"id": 1}', "", '{"prompt": "t5",', '{"prompt": "t5", "max_tokens": 0}',
             '{"token_ids": [5, "t6"]}']  # a UTF-8 BOM first: accepted
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert batch_cli.main(["--model", path, "--input", str(file), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nanovllm.batch: error: {file}:2: no 'prompt' or 'token_ids' key")
    assert "(and 3 more bad rows)" in err and f"{file}:4: not valid JSON: Expecting property name" in err
    assert f"{file}:5: max_tokens must be an integer >= 1, got 0" in err
    assert f"{file}:6: 'token_ids' must be a string or a list of int token ids" in err
    assert f"{file}:1:" not in err and not output.exists()


def test_a_row_the_engine_rejects_leaves_no_output_file(path, tmp_path, capsys):
    rows = ROWS[:5] + [{"prompt": " ".join(["t7"] * 300)}] + ROWS[5:10]  # longer than max_model_len
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out" / "result.jsonl"
    assert batch_cli.main(cli(path, str(file), str(output), "--no-ray")) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"nanovllm.batch: error: {file}:6: prompt length 300 + max_tokens {MAX_TOKENS} = "
                   f"{300 + MAX_TOKENS} exceeds max_model_len 256")
    assert os.listdir(output.parent) == []  # neither the file nor its temporary


def test_help_is_fast_and_shows_every_default():
    code = ("import sys, contextlib, io\n"
            "from nanovllm import batch\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    batch.main(['--help'])\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import before --help'\n"
            "print(out.getvalue())\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, capture_output=True, text=True).stdout
    options = " ".join(text.split("options:")[1].split())
    for flag, default in [("--batch-size", 256), ("--max-concurrent-batches", 2), ("--replicas", 1),
                          ("--max-tokens", None), ("--input-format", "auto"), ("--no-ray", False)]:
        help_text = options.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in help_text, (flag, help_text)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanovllm.batch: error: "), err
    return err


@pytest.fixture(scope="module")
def misshaped(path, tmp_path_factory) -> str:
    """The checkpoint with one tensor cut in half: its config reads, its engine does not start."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("misshaped")
    shutil.copytree(path, out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:, : tensors[name].shape[1] // 2].contiguous()
    save_file(tensors, out / "model.safetensors")
    return str(out)


def test_an_engine_that_does_not_start_on_ray_is_one_line(ray_cluster, misshaped, input_file, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    assert batch_cli.main(cli(misshaped, input_file, str(output))) == 2
    err = capsys.readouterr().err  # NOTE: with Ray's own log lines (the session's Ray prints them)
    assert re.search(f"^nanovllm.batch: error: --model {misshaped}: the engine did not start: checkpoint tensor "
                     r"'.*q_proj.weight': shape mismatch: .*$", err, re.M)
    assert not output.exists() and os.listdir(tmp_path) == ["prompts.jsonl"]


def test_no_memory_for_the_kv_cache_is_one_line(path, input_file, tmp_path, capsys):
    args = cli(path, input_file, str(tmp_path / "out.jsonl"), "--no-ray", "--engine-kwargs", '{"cpu_kvcache_bytes": 1}')
    assert batch_cli.main(args) == 2
    assert "the engine did not start: no memory left for the KV cache" in one_line_error(capsys)
    assert os.listdir(tmp_path) == ["prompts.jsonl"]


def write_parquet(file, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), file)
    return str(file)


@pytest.mark.parametrize("rows, output, message", [
    ([{"prompt": "t5", "id": 1}, {"prompt": "t6", "id": "x"}], "o.parquet",
     r"column 'id' cannot be written to parquet \(Could not convert 'x'.*\); write jsonl instead"),
    ([{"prompt": "t5", "meta": {}}], "o.parquet", r"column 'meta' cannot be written to parquet \(.*no child field"),
    ({"prompt": ["t5"], "blob": [b"\x00\xff"]}, "o.jsonl",
     r"column 'blob' cannot be written to jsonl \(JSON cannot hold bytes values\); write parquet instead"),
])
def test_columns_the_output_cannot_hold_fail_before_the_model_loads(path, tmp_path, capsys, no_engine,
                                                                    rows, output, message):
    pytest.importorskip("pyarrow")
    if isinstance(rows, dict):
        file = write_parquet(tmp_path / "rows.parquet", rows)
    else:
        file = tmp_path / "rows.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert batch_cli.main(["--model", path, "--input", str(file), "--output", str(tmp_path / output)]) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / output).exists()


def test_parquet_dates_and_decimals_are_strings_in_jsonl(path, tmp_path):
    pytest.importorskip("pyarrow")
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, 6)
    file = write_parquet(tmp_path / "rows.parquet", {"prompt": ["t5 t6"], "when": [when], "day": [when.date()],
                                                     "price": [decimal.Decimal("1.50")]})
    output = str(tmp_path / "out.jsonl")
    assert batch_cli.main(cli(path, file, output, "--no-ray")) == 0
    (out,) = read_jsonl(output)
    assert (out["when"], out["day"], out["price"]) == ("2024-01-02T03:04:05.000006", "2024-01-02", "1.50")


@pytest.mark.parametrize("case", ["output under a file", "output under /proc", "output is a folder",
                                  "folder named .jsonl in the input", "corrupt parquet", "output is the input"])
def test_unusable_paths_fail_before_the_model_loads(path, input_file, tmp_path, capsys, no_engine, case):
    before = open(input_file).read()
    inputs, output, message = input_file, str(tmp_path / "out.jsonl"), None
    if case == "output under a file":
        output, message = f"{input_file}/out.jsonl", f"--output {input_file}/out.jsonl: cannot write there: "
    elif case == "output under /proc":
        output, message = "/proc/nanovllm-test/out.jsonl", "--output /proc/nanovllm-test/out.jsonl: cannot write"
    elif case == "output is a folder":
        os.mkdir(output)
        message = f"--output {output} is a directory"
    elif case == "folder named .jsonl in the input":
        os.mkdir(tmp_path / "sub.jsonl")
        inputs, message = str(tmp_path), f"input {tmp_path}/sub.jsonl: Is a directory"
    elif case == "corrupt parquet":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
        inputs, message = str(tmp_path / "bad.parquet"), f"input {tmp_path}/bad.parquet: not a readable Parquet file"
    else:
        output, message = input_file, f"--output {input_file} is an input file"
    assert batch_cli.main(cli(path, inputs, output)) == 2
    assert one_line_error(capsys).startswith(f"nanovllm.batch: error: {message}")
    assert open(input_file).read() == before


def test_tensor_parallel_size_in_engine_kwargs_points_to_tp(path, input_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        batch_cli.main(cli(path, input_file, str(tmp_path / "o.jsonl"), "--engine-kwargs",
                           '{"tensor_parallel_size": 2}'))
    assert exit.value.code == 2
    assert "error: --engine-kwargs: give tensor_parallel_size with --tp instead" in capsys.readouterr().err


def test_sigterm_leaves_no_partial_file(path, input_file, tmp_path):
    output = tmp_path / "out"
    args = cli(path, input_file, str(output / "out.jsonl"), "--no-ray", "--max-tokens", "200",
               "--sampling-params", '{"ignore_eos": true}')
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    job = subprocess.Popen([sys.executable, "-m", "nanovllm.batch", *args], cwd=repo, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (output.exists() and os.listdir(output)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(output) == [f".out.jsonl.{job.pid}.tmp"]  # the job is writing
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        job.kill()
    assert os.listdir(output) == []
