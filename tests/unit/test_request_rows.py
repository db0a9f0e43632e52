"""`submit_rows` against a stand-in engine: a batch the engine rejects is retried one request
at a time so that only the bad request gets an error; an engine failure fails the whole job."""
import concurrent.futures
import json

import pytest

from nanovllm.integrations.request_rows import decode_result, encode_request, submit_rows


class Engine:
    """EngineLoop's `submit`: a prompt "bad" is rejected (ValueError), "crash" fails the engine."""

    def __init__(self):
        self.batches = []

    def submit(self, prompts, params):
        self.batches.append(list(prompts))
        future = concurrent.futures.Future()
        if "bad" in prompts:  # validation comes first, as in the engine
            future.set_exception(ValueError("prompts[0]: prompt length 99 exceeds max_model_len 64"))
        elif "crash" in prompts:
            future.set_exception(RuntimeError("worker rank 1 died"))
        else:
            future.set_result([{"text": p.upper(), "token_ids": [1], "prompt_token_ids": [2],
                                "finish_reason": "length", "stop_reason": None, "metrics": {"seconds": 0.1}}
                               for p in prompts])
        return future


def requests(*prompts):
    return [encode_request(p, {"max_tokens": 1}) for p in prompts]


def test_a_rejected_request_gets_its_error_and_the_others_run():
    engine = Engine()
    results = [decode_result(r) for r in submit_rows(engine, requests("a", "bad", "c")).result(timeout=5)]
    assert engine.batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    assert [r.get("text") for r in results] == ["A", None, "C"]
    assert results[1] == {"error": "prompt length 99 exceeds max_model_len 64"}
    assert "metrics" not in results[0]  # timing differs run to run; the files do not


def test_bad_sampling_params_are_a_row_error_without_the_engine():
    engine = Engine()
    rows = requests("a") + [json.dumps({"prompt": "b", "sampling_params": {"max_tokens": 0}})]
    results = [decode_result(r) for r in submit_rows(engine, rows).result(timeout=5)]
    assert engine.batches == [["a"]]
    assert results[0]["text"] == "A" and "max_tokens must be an integer >= 1, got 0" in results[1]["error"]


def test_an_engine_failure_fails_the_job():
    with pytest.raises(RuntimeError, match="worker rank 1 died"):
        submit_rows(Engine(), requests("a", "crash")).result(timeout=5)
    engine = Engine()
    with pytest.raises(RuntimeError, match="worker rank 1 died"):  # found while retrying one by one
        submit_rows(engine, requests("bad", "crash")).result(timeout=5)
    assert engine.batches == [["bad", "crash"], ["bad"], ["crash"]]
