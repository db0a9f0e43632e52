"""Rows that each carry one whole request and get back one whole result: the engine side of
`python -m nanovllm.batch`, run the same way in this process (`submit_rows` on an
`EngineLoop`) and in Ray actors (`RequestPredictor`, through `predict(predictor=...)`).

A request is a JSON string `{"prompt": str | [int], "sampling_params": {SamplingParams fields}}`
(`encode_request`); a result is a JSON string holding `LLM.generate`'s dict without its timing
metrics, or `{"error": message}` for a request the engine rejected (too long for the model,
logprobs over the vocabulary, a constraint that does not compile): one bad row never fails the
others."""
import asyncio
import concurrent.futures
import json
import re
import threading
import weakref

from nanovllm.integrations.columns import column_values, object_array
from nanovllm.integrations.ray import EngineLoop
from nanovllm.sampling_params import SamplingParams

REQUEST_COLUMN = "request"
RESULT_COLUMN = "result"
# what the engine raises for a request it will not run (too long, logprobs over the vocabulary, a
# constraint that does not compile): that request's error; anything else fails the job
REJECTED = (TypeError, ValueError)


def encode_request(prompt: str | list[int], sampling_params: dict) -> str:
    return json.dumps({"prompt": prompt, "sampling_params": sampling_params}, ensure_ascii=False)


def submit_rows(engine: EngineLoop, requests: list[str]) -> concurrent.futures.Future:
    """Run encoded requests as one batch; the future gets one result (JSON string) per request,
    in order. If the engine rejects the batch (its validation runs before any request does), each
    request is submitted alone, so that only the bad ones get an error."""
    prompts, params, errors = [], [], {}
    for i, text in enumerate(requests):
        request = json.loads(text)
        try:
            params.append(SamplingParams(**request["sampling_params"]))
            prompts.append(request["prompt"])
        except (TypeError, ValueError) as e:  # checked by the driver already; kept as a row error
            errors[i] = str(e)
    done = concurrent.futures.Future()
    rows = [i for i in range(len(requests)) if i not in errors]

    def finish(outputs: list) -> None:
        results = dict(errors)
        results.update(zip(rows, outputs))
        done.set_result([_result_json(results[i]) for i in range(len(requests))])

    def on_batch(future: concurrent.futures.Future) -> None:
        error = future.exception()
        try:
            if error is None:
                finish(future.result())
            elif not isinstance(error, REJECTED):
                done.set_exception(error)  # the engine failed, not a request: the job fails
            elif len(rows) == 1:
                finish([_row_error(error)])
            else:
                _gather([engine.submit([p], [sp]) for p, sp in zip(prompts, params)], finish, done)
        except BaseException as e:  # NOTE: the engine loop stopped: fail, never leave the caller waiting
            done.set_exception(e)

    if rows:
        engine.submit(prompts, params).add_done_callback(on_batch)
    else:
        finish([])
    return done


def _gather(futures: list[concurrent.futures.Future], then, done: concurrent.futures.Future) -> None:
    """Once every single-request future is done: `then` with each output or rejection, or `done`
    fails with an engine failure."""
    left, lock = [len(futures)], threading.Lock()

    def on_done(_):
        with lock:  # NOTE: callbacks run on the engine thread, or here if a future is already done
            left[0] -= 1
            if left[0]:
                return
        failed = [f.exception() for f in futures if f.exception() and not isinstance(f.exception(), REJECTED)]
        if failed:
            done.set_exception(failed[0])
        else:
            then([_row_error(f.exception()) if f.exception() else f.result()[0] for f in futures])

    for future in futures:
        future.add_done_callback(on_done)


def _row_error(error: BaseException) -> str:
    # the engine names the request by its index in the one-request batch: say "the prompt" instead
    message = re.sub(r"\b(prompts|sampling_params)\[0\]: ", "", str(error))
    return re.sub(r"\b(prompts|sampling_params)\[0\]", "the prompt", message)


def _result_json(result: dict | str) -> str:
    if isinstance(result, str):
        return json.dumps({"error": result}, ensure_ascii=False)
    return json.dumps(_without_metrics(result), ensure_ascii=False)


def _without_metrics(output: dict) -> dict:
    """Timing differs from run to run; the files a job writes do not."""
    out = {k: v for k, v in output.items() if k != "metrics"}
    if "outputs" in out:
        out["outputs"] = [_without_metrics(sample) for sample in out["outputs"]]
    return out


def decode_result(text: str) -> dict:
    """A result row back to generate's dict (logprob ids are ints again), or {"error": message}."""
    result = json.loads(text)
    for sample in [result, *result.get("outputs", [])]:
        for entry in sample.get("logprobs") or []:
            entry["top_logprobs"] = {int(k): v for k, v in entry["top_logprobs"].items()}
    return result


class RequestPredictor:
    """`Dataset.map_batches` callable for request rows: a `request` column in, a `result` column out."""

    def __init__(self, model: str, sampling_params=None, prompt_column=None, **llm_kwargs):
        if sampling_params is not None or prompt_column is not None:
            raise TypeError("request rows carry their own prompt and sampling params")
        self.engine = EngineLoop(model, llm_kwargs)
        self._finalizer = weakref.finalize(self, self.engine.close)

    async def __call__(self, batch):
        requests = [str(r) for r in column_values(batch, REQUEST_COLUMN)]
        results = await asyncio.wrap_future(submit_rows(self.engine, requests))
        yield {RESULT_COLUMN: object_array(results)}

    def close(self) -> None:
        self._finalizer()
