"""OpenAI Batch API files through `python -m nanovllm.batch`: every mapped body field lands in
SamplingParams; a file mixing good and bad lines gives each good line exactly what
`LLM.generate` gives it alone (prompt ids and params written by hand here) and each bad line
an error; every output line has OpenAI's batch output shape; Ray writes the same file."""
import json
import shutil

import jsonschema
import pytest
from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams
from nanovllm import batch as batch_cli
from nanovllm.integrations.openai_batch import LineError, parse_line
from tests.e2e.test_chat import TEMPLATE

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=64)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def line(cid: str, url: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# (input line, its prompt ids under TEMPLATE, its SamplingParams): the oracle, written by hand
GOOD = [
    (line("c0", CHAT, messages=user("t10 t11"), max_tokens=4, temperature=0), [3, 10, 11, 4, 5],
     dict(max_tokens=4, temperature=0)),
    (line("p1", COMPLETIONS, prompt="t30 t31 t32", max_tokens=5, temperature=0, logprobs=2), [30, 31, 32],
     dict(max_tokens=5, temperature=0, logprobs=2)),
    (line("c2", CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "t40"}]}],
          max_completion_tokens=3, temperature=0.8, seed=11, n=2, logprobs=True, top_logprobs=2),
     [3, 40, 4, 5], dict(max_tokens=3, temperature=0.8, seed=11, n=2, logprobs=2)),
    (line("p3", COMPLETIONS, prompt=[50, 51, 52], max_tokens=6, temperature=0.7, top_p=0.9, seed=3,
          presence_penalty=0.5, frequency_penalty=-0.5, stop=["t7"]), [50, 51, 52],
     dict(max_tokens=6, temperature=0.7, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=-0.5,
          stop=["t7"])),
]
# (the raw line, the error code its output must carry)
BAD = [
    ('{"custom_id": "b0", "url": ', "invalid_json"),
    (json.dumps(line("b1", "/v1/embeddings", input="t5")), "invalid_url"),
    (json.dumps(line("b2", CHAT, messages=user("t5"), temperature=-1)), "invalid_value"),
    (json.dumps({"custom_id": "b3", "method": "POST", "url": COMPLETIONS, "body": {"max_tokens": 3}}),
     "missing_field"),
    (json.dumps(line("b4", CHAT, messages=[{"role": "robot", "content": "t5"}])), "invalid_value"),
    # the engine rejects it (prompt + max_tokens over max_model_len): found after the model loads
    (json.dumps(line("b5", COMPLETIONS, prompt=" ".join(["t9"] * 60), max_tokens=8)), "invalid_request"),
    # lines that once stopped the whole job with a traceback (or, for n, an endless loop)
    (json.dumps(line("b6", [COMPLETIONS], prompt="t5")), "invalid_url"),
    (json.dumps(line("b7", CHAT, messages=user("t5"), response_format={"type": "json_schema", "json_schema": "x"})),
     "invalid_value"),
    ("[" * 100_000 + "]" * 100_000, "invalid_json"),
    (json.dumps(line("b9", COMPLETIONS, prompt="t5", n=10**30)), "invalid_value"),
]
ORDER = ["g0", "b0", "g1", "b1", "b2", "g2", "b3", "b4", "g3", "b5", "b6", "b7", "b8", "b9"]


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint, its tokenizer given TEMPLATE as its own chat template."""
    path = str(tmp_path_factory.mktemp("chat-model"))
    shutil.copytree(checkpoint("qwen3"), path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def alone(model_dir) -> list[dict]:
    """Each good line run by itself through LLM.generate."""
    llm = LLM(model_dir, **ENGINE)
    try:
        return [llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0] for _, prompt, params in GOOD]
    finally:
        llm.exit()


@pytest.fixture(scope="module")
def input_file(tmp_path_factory) -> str:
    texts = {f"g{i}": json.dumps(good[0]) for i, good in enumerate(GOOD)}
    texts.update({f"b{i}": text for i, (text, _) in enumerate(BAD)})
    path = tmp_path_factory.mktemp("openai") / "batch.jsonl"
    path.write_text("".join(texts[key] + "\n" for key in ORDER))
    return str(path)


def run_cli(model_dir: str, input_file: str, output: str, *extra: str) -> list[dict]:
    argv = ["--model", model_dir, "--input", input_file, "--output", output, "--engine-kwargs", json.dumps(ENGINE),
            "--batch-size", "3", *extra]
    assert batch_cli.main(argv) == 0
    with open(output) as f:
        return [json.loads(text) for text in f]


@pytest.fixture(scope="module")
def in_process(model_dir, input_file, tmp_path_factory) -> list[dict]:
    return run_cli(model_dir, input_file, str(tmp_path_factory.mktemp("out") / "out.jsonl"), "--no-ray")


# ---- every mapped field lands in SamplingParams ------------------------------------------
MAPPING = [  # (url, body fields, the SamplingParams fields they must set)
    (CHAT, dict(max_tokens=7), dict(max_tokens=7)),
    (CHAT, dict(max_completion_tokens=9, max_tokens=7), dict(max_tokens=9)),
    (COMPLETIONS, dict(max_tokens=5), dict(max_tokens=5)),
    (CHAT, dict(temperature=0.3, top_p=0.5, seed=42, n=3), dict(temperature=0.3, top_p=0.5, seed=42, n=3)),
    (COMPLETIONS, dict(stop="t8"), dict(stop=("t8",))),
    (CHAT, dict(stop=["t8", "t9"]), dict(stop=("t8", "t9"))),
    (CHAT, dict(presence_penalty=1.5, frequency_penalty=-2.0), dict(presence_penalty=1.5, frequency_penalty=-2.0)),
    (CHAT, dict(logprobs=True, top_logprobs=4), dict(logprobs=4)),
    (CHAT, dict(logprobs=True), dict(logprobs=0)),
    (CHAT, dict(logprobs=False), dict(logprobs=None)),
    (COMPLETIONS, dict(logprobs=3), dict(logprobs=3)),
    (CHAT, dict(temperature=None, response_format={"type": "text"}), dict(temperature=1.0)),  # null: the default
]


@pytest.mark.parametrize("url, body, expected", MAPPING)
def test_every_mapped_field_lands_in_sampling_params(tokenizer, url, body, expected):
    prompt = {"messages": user("t5")} if url == CHAT else {"prompt": "t5"}
    request = parse_line(line("x", url, **prompt, **body), {}, tokenizer)
    params = SamplingParams(**request.sampling_params)
    assert {name: getattr(params, name) for name in expected} == expected


def test_job_defaults_are_overridden_by_the_body(tokenizer):
    request = parse_line(line("x", CHAT, messages=user("t5"), max_tokens=3), {"max_tokens": 9, "top_p": 0.5}, tokenizer)
    assert request.sampling_params == {"max_tokens": 3, "top_p": 0.5}


@pytest.mark.parametrize("response_format, constraint", [
    ({"type": "json_object"}, {"json_object": True}),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}, {"json": {"type": "object"}}),
])
def test_response_format_maps_to_structured_outputs(tokenizer, response_format, constraint):
    body = line("x", CHAT, messages=user("t5"), response_format=response_format)
    assert parse_line(body, {}, tokenizer).sampling_params["structured_outputs"] == constraint


@pytest.mark.parametrize("body, code, message", [
    (dict(prompt="t5", logit_bias={"5": 1}), "unsupported_parameter", "body.logit_bias is not supported"),
    (dict(prompt=["t5", "t6"]), "invalid_value", "one prompt per line"),
    (dict(prompt="t5", n=0), "invalid_value", r"n must be an integer in \[1, 65536\], got 0"),
    (dict(prompt="t5", top_p=2), "invalid_value", r"top_p must be in \(0, 1\], got 2"),
])
def test_bad_completion_bodies(tokenizer, body, code, message):
    with pytest.raises(LineError, match=message) as e:
        parse_line(line("x", COMPLETIONS, **body), {}, tokenizer)
    assert e.value.code == code


def test_chat_only_checks(tokenizer):
    with pytest.raises(LineError, match="top_logprobs needs body.logprobs set to true"):
        parse_line(line("x", CHAT, messages=user("t5"), top_logprobs=2), {}, tokenizer)
    with pytest.raises(LineError, match=r"body.messages\[0\] has no 'content' key"):
        parse_line(line("x", CHAT, messages=[{"role": "user"}]), {}, tokenizer)
    with pytest.raises(LineError, match="only text content parts"):
        parse_line(line("x", CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), {}, tokenizer)


# ---- the job: good lines as alone, bad lines as errors, OpenAI's output shape --------------
_ERROR = {"type": "object", "required": ["code", "message"],
          "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_CHOICE = {"type": "object", "required": ["index", "finish_reason", "logprobs"],
           "properties": {"index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length"]},
                          "text": {"type": "string"}, "logprobs": {"type": ["object", "null"]},
                          "message": {"type": "object", "required": ["role", "content"],
                                      "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}}
_BODY = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
         "properties": {"id": {"type": "string"}, "object": {"enum": ["chat.completion", "text_completion"]},
                        "created": {"type": "integer"}, "model": {"type": "string"},
                        "choices": {"type": "array", "minItems": 1, "items": _CHOICE}, "usage": _USAGE}}
OUTPUT_LINE = {  # OpenAI's batch output line
    "type": "object", "required": ["id", "custom_id", "response", "error"], "additionalProperties": False,
    "properties": {"id": {"type": "string"}, "custom_id": {"type": ["string", "null"]},
                   "error": {"oneOf": [{"type": "null"}, _ERROR]},
                   "response": {"type": "object", "required": ["status_code", "request_id", "body"],
                                "properties": {"status_code": {"enum": [200, 400]}, "request_id": {"type": "string"},
                                               "body": {"type": "object"}}}}}


def test_output_lines_have_the_openai_shape_in_input_order(in_process):
    assert len(in_process) == len(ORDER)
    for key, out in zip(ORDER, in_process):
        jsonschema.validate(out, OUTPUT_LINE)
        if key.startswith("g"):
            request = GOOD[int(key[1:])][0]
            assert out["custom_id"] == request["custom_id"] and out["error"] is None
            assert out["response"]["status_code"] == 200
            jsonschema.validate(out["response"]["body"], _BODY)
            assert out["response"]["body"]["object"] == ("chat.completion" if request["url"] == CHAT
                                                         else "text_completion")
    assert len({out["id"] for out in in_process}) == len(ORDER)


def approx(values: list[float]):
    """Logprobs in another batch: float32 sums in another order (the tokens themselves are equal)."""
    return pytest.approx(values, abs=1e-4)


def test_each_good_line_gets_what_it_gets_alone(in_process, alone):
    for i, ((request, prompt, params), expected) in enumerate(zip(GOOD, alone)):
        body = in_process[ORDER.index(f"g{i}")]["response"]["body"]
        samples = expected.get("outputs") or [expected]
        assert len(body["choices"]) == params.get("n", 1)
        for choice, sample in zip(body["choices"], samples):
            text = choice["message"]["content"] if request["url"] == CHAT else choice["text"]
            assert text == sample["text"] and choice["finish_reason"] == sample["finish_reason"]
        num_completion = sum(len(sample["token_ids"]) for sample in samples)
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": num_completion,
                                 "total_tokens": len(prompt) + num_completion}
        logprobs = [choice["logprobs"] for choice in body["choices"]]
        if "logprobs" not in params:
            assert logprobs == [None] * len(samples)
        elif request["url"] == CHAT:  # one entry per token: its logprob and the top alternatives
            for lp, sample in zip(logprobs, samples):
                assert [e["logprob"] for e in lp["content"]] == approx([e["logprob"] for e in sample["logprobs"]])
                assert [[t["logprob"] for t in e["top_logprobs"]] for e in lp["content"]] == \
                    [approx(list(e["top_logprobs"].values())) for e in sample["logprobs"]]
        else:
            (lp,) = logprobs
            assert lp["token_logprobs"] == approx([e["logprob"] for e in samples[0]["logprobs"]])
            assert [len(t) for t in lp["top_logprobs"]] == [2] * len(samples[0]["token_ids"])


def test_each_bad_line_gets_an_error(in_process, capsys):
    for i, (_, code) in enumerate(BAD):
        out = in_process[ORDER.index(f"b{i}")]
        assert out["response"]["status_code"] == 400 and out["error"]["code"] == code, out
        assert out["response"]["body"]["error"]["code"] == code
        assert out["custom_id"] == (None if code == "invalid_json" else f"b{i}")


def test_summary_and_model_note(model_dir, input_file, tmp_path, capsys):
    run_cli(model_dir, input_file, str(tmp_path / "o.jsonl"), "--no-ray")
    err = capsys.readouterr().err
    assert "14 lines: 4 succeeded, 10 failed" in err
    assert err.count("body.model (gpt-4o-mini) is ignored") == 1
    assert f"{input_file}:2: invalid_json: not valid JSON" in err


def assert_same_output(got, expected, path="") -> None:
    """Equal JSON, floats to 1e-4: replicas batch other requests beside a line than one process
    does, and CPU matmuls round by the batch's shape, so logprobs may differ in the last bits."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-4), path
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected:
            assert_same_output(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same_output(g, e, f"{path}[{i}]")
    else:
        assert got == expected, path


def test_ray_writes_the_same_file(ray_cluster, model_dir, input_file, in_process, tmp_path):
    on_ray = run_cli(model_dir, input_file, str(tmp_path / "ray.jsonl"), "--replicas", "2")
    for out in on_ray + in_process:  # NOTE: the job's start time is the only other field that differs
        if out["response"]["status_code"] == 200:
            out["response"]["body"]["created"] = 0
    assert_same_output(on_ray, in_process)
