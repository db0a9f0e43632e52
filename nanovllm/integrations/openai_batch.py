"""OpenAI Batch API files (https://platform.openai.com/docs/api-reference/batch): input lines
`{"custom_id", "method": "POST", "url", "body"}` to prompts and SamplingParams, and results to
output lines `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

`/v1/chat/completions` takes `body.messages` (through the tokenizer's chat template) and
`/v1/completions` takes `body.prompt` (a string or a list of token ids). A line that cannot run
(bad JSON, an unknown url, a missing field, a value out of range) raises `LineError`, which
becomes that line's error output (status 400); the other lines run."""
import hashlib
from dataclasses import dataclass

from nanovllm.engine.chat import chat_prompt_ids
from nanovllm.sampling_params import SamplingParams

CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
# body fields taken over as they are (OpenAI's names are SamplingParams' names)
SAME_NAME = ("temperature", "top_p", "seed", "n", "stop", "presence_penalty", "frequency_penalty")
# body fields with no effect here: one model runs the whole job; results are not stored
IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier"})
MAPPED = {CHAT: frozenset({"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                           "response_format", *SAME_NAME}),
          COMPLETION: frozenset({"prompt", "max_tokens", "logprobs", *SAME_NAME})}


class LineError(ValueError):
    """Why one input line cannot run: its error object is `{"code", "message"}`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class OpenAIRequest:
    custom_id: str
    url: str
    prompt: str | list[int]      # token ids for chat (the template applied), else the body's prompt
    sampling_params: dict        # SamplingParams fields, validated
    logprobs: bool               # whether the choices carry logprobs


def is_openai_line(obj) -> bool:
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def parse_line(obj, base_params: dict, tokenizer) -> OpenAIRequest:
    """One parsed JSON line -> a request, or LineError. `base_params`: the job's SamplingParams
    fields, which the body's fields override."""
    if not isinstance(obj, dict):
        raise LineError("invalid_request", f"expected a JSON object, got {type(obj).__name__}")
    for key in ("custom_id", "url", "body"):
        if key not in obj:
            raise LineError("missing_field", f"the line has no {key!r}")
    if not isinstance(obj["custom_id"], str):
        raise LineError("invalid_value", f"custom_id must be a string, got {obj['custom_id']!r:.80}")
    if obj.get("method", "POST") != "POST":
        raise LineError("invalid_value", f"method must be 'POST', got {obj['method']!r:.80}")
    url, body = obj["url"], obj["body"]
    if not isinstance(url, str) or url not in MAPPED:
        raise LineError("invalid_url", f"url {url!r:.80} is not supported; use {CHAT!r} or {COMPLETION!r}")
    if not isinstance(body, dict):
        raise LineError("invalid_value", f"body must be a JSON object, got {type(body).__name__}")
    body = {k: v for k, v in body.items() if v is not None and k not in IGNORED}  # null: OpenAI's default
    unsupported = sorted(set(body) - MAPPED[url])
    if unsupported:
        raise LineError("unsupported_parameter", f"body.{unsupported[0]} is not supported for {url}")
    params = {**base_params, **sampling_fields(body, url)}
    try:
        SamplingParams(**params)
    except (TypeError, ValueError) as e:
        raise LineError("invalid_value", f"body: {e}") from e
    prompt = chat_prompt(body, tokenizer) if url == CHAT else completion_prompt(body)
    return OpenAIRequest(obj["custom_id"], url, prompt, params, params.get("logprobs") is not None)


def sampling_fields(body: dict, url: str) -> dict:
    """The SamplingParams fields a request body sets (OpenAI names -> ours)."""
    out = {name: body[name] for name in SAME_NAME if name in body}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if url == COMPLETION:
        if "logprobs" in body:  # completions: the number of alternatives
            out["logprobs"] = body["logprobs"]
        return out
    if "top_logprobs" in body and body.get("logprobs") is not True:
        raise LineError("invalid_value", "body.top_logprobs needs body.logprobs set to true")
    if "logprobs" in body:
        if not isinstance(body["logprobs"], bool):
            raise LineError("invalid_value", f"body.logprobs must be true or false, got {body['logprobs']!r:.80}")
        if body["logprobs"]:
            out["logprobs"] = body.get("top_logprobs", 0)
    if "response_format" in body:
        constraint = _structured_outputs(body["response_format"])
        if constraint is not None:
            out["structured_outputs"] = constraint
    return out


def _structured_outputs(response_format) -> dict | None:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        constraint = {"json_object": True}
    elif kind == "json_schema":
        json_schema = response_format.get("json_schema") or {}
        if not isinstance(json_schema, dict):
            raise LineError("invalid_value", f"body.response_format.json_schema must be an object "
                                             f"{{'name', 'schema'}}, got {json_schema!r:.80}")
        schema = json_schema.get("schema")
        if schema is None:
            raise LineError("missing_field", "body.response_format.json_schema has no 'schema'")
        constraint = {"json": schema}
    else:
        raise LineError("invalid_value", f"body.response_format.type must be 'text', 'json_object' or "
                                         f"'json_schema', got {kind!r:.80}")
    return constraint


def chat_prompt(body: dict, tokenizer) -> list[int]:
    if "messages" not in body:
        raise LineError("missing_field", "body has no 'messages'")
    messages = body["messages"]
    if isinstance(messages, list):
        messages = [_text_content(m) for m in messages]
    try:
        (prompt,) = chat_prompt_ids(tokenizer, [messages])
    except (TypeError, ValueError) as e:
        raise LineError("invalid_value", str(e).replace("conversations[0]", "body.messages")) from e
    return prompt


def _text_content(message):
    """OpenAI's content parts [{"type": "text", "text": ...}] -> one string; other parts are refused."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = message["content"]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise LineError("unsupported_parameter", "body.messages: only text content parts are supported")
    return {**message, "content": "".join(p["text"] for p in parts)}


def completion_prompt(body: dict) -> str | list[int]:
    if "prompt" not in body:
        raise LineError("missing_field", "body has no 'prompt'")
    prompt = body["prompt"]
    if isinstance(prompt, str) and prompt:
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        return prompt
    raise LineError("invalid_value", f"body.prompt must be a non-empty string or a list of token ids (one prompt "
                                     f"per line), got {prompt!r:.80}")


# ---- output lines ----------------------------------------------------------------------
@dataclass(frozen=True)
class JobInfo:
    model: str      # the job's --model, reported as each response's model
    created: int    # unix time of the job's start


def response_line(line_number: int, request: OpenAIRequest, result: dict, job: JobInfo, tokenizer) -> dict:
    """A finished request's output line: status 200 and a chat.completion / text_completion body."""
    samples = result.get("outputs") or [{**result, "index": 0}]
    chat = request.url == CHAT
    choices = [_choice(sample, chat, request.logprobs, tokenizer) for sample in samples]
    num_prompt = len(result["prompt_token_ids"])
    num_completion = sum(len(sample["token_ids"]) for sample in samples)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{_digest(line_number, request.custom_id)}",
            "object": "chat.completion" if chat else "text_completion", "created": job.created,
            "model": job.model, "choices": choices,
            "usage": {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
                      "total_tokens": num_prompt + num_completion}}
    return _line(line_number, request.custom_id, 200, body, None)


def error_line(line_number: int, custom_id, error: LineError) -> dict:
    """A line that did not run: status 400, OpenAI's error body, and the `error` object."""
    body = {"error": {"message": str(error), "type": "invalid_request_error", "param": None, "code": error.code}}
    return _line(line_number, custom_id if isinstance(custom_id, str) else None, 400, body,
                 {"code": error.code, "message": str(error)})


def _line(line_number: int, custom_id, status: int, body: dict, error: dict | None) -> dict:
    digest = _digest(line_number, custom_id)
    return {"id": f"batch_req_{digest}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{digest}", "body": body}, "error": error}


def _digest(line_number: int, custom_id) -> str:
    """Ids that are the same in every run of the same file (so two runs' files compare equal)."""
    return hashlib.sha256(f"{line_number}\0{custom_id}".encode()).hexdigest()[:24]


def _choice(sample: dict, chat: bool, logprobs: bool, tokenizer) -> dict:
    choice = {"index": sample["index"]}
    if chat:
        choice["message"] = {"role": "assistant", "content": sample["text"]}
    else:
        choice["text"] = sample["text"]
    entries = sample.get("logprobs") if logprobs else None
    choice["logprobs"] = None if entries is None else (_chat_logprobs if chat else _completion_logprobs)(
        entries, tokenizer)
    choice["finish_reason"] = sample["finish_reason"]
    return choice


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _chat_logprobs(entries: list[dict], tokenizer) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        token = _token(tokenizer, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [{**item(e["token_id"], e["logprob"]),
                "top_logprobs": [item(t, lp) for t, lp in e["top_logprobs"].items()]} for e in entries]
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[dict], tokenizer) -> dict:
    tokens = [_token(tokenizer, e["token_id"]) for e in entries]
    offsets, offset = [], 0
    for token in tokens:  # NOTE: offsets into the completion text (OpenAI counts from the prompt's start)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_token(tokenizer, t): lp for t, lp in e["top_logprobs"].items()} for e in entries],
            "text_offset": offsets}

