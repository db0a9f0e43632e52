"""Batch inference on Ray Data: one engine per actor, through `Dataset.map_batches`.

    import ray
    from nanovllm.integrations.ray import LLMPredictor

    ds = ray.data.read_json("prompts.jsonl")              # a `prompt` column (or `token_ids`)
    ds = ds.map_batches(LLMPredictor,
                        fn_constructor_kwargs=dict(model="/models/Qwen3-0.6B",
                                                   sampling_params=dict(temperature=0, max_tokens=128),
                                                   tensor_parallel_size=TP),   # + any LLM(...) keyword
                        compute=ray.data.ActorPoolStrategy(size=R,    # R engines, 2 batches in each at once
                                                           max_concurrent_calls_per_actor=2),
                        num_gpus=TP,                                  # GPUs per engine
                        batch_size=256)
    # Ray < 2.51: ActorPoolStrategy(size=R) and max_concurrency=2
    ds.write_parquet("out/")

The columns are `nanovllm.integrations.columns`' contract: a prompt column in, the
`generated_text`, `generated_token_ids` and `finish_reason` columns added, the rest kept.
`predict(ds, model, replicas=R, tensor_parallel_size=TP)` makes that call with our defaults.

The engine is kept busy across batches. A synchronous predictor would run each batch to
the end, so every batch's tail (its last few sequences decoding) would leave the engine
mostly idle. Here each actor's engine steps on a background thread and `__call__` is an
async generator that only submits its batch and awaits it: batches that Ray runs at the
same time in one actor (K concurrent calls, and up to 4 batches of one task) join the
engine's running batch between two steps, and rows that do not fit wait in its queue, so
when one batch ends the next is already in the engine. Large batches (DEFAULT_BATCH_SIZE)
shrink the tail's share further.

Nothing here imports `ray` at import time; only `predict` and `init_ray` do.
"""
import asyncio
import concurrent.futures
import logging
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass, field

from nanovllm.integrations.columns import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_CONCURRENT_BATCHES, Prompt,
                                           requests_from_batch, sampling_params_from, with_outputs)
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class _Job:
    prompts: list[Prompt]
    params: list[SamplingParams]
    future: concurrent.futures.Future
    requests: list = field(default_factory=list)   # the engine's RequestStates, once queued


_STOP = object()


class EngineLoop:
    """One `LLM`, built and stepped on a background thread, serving batches submitted from
    any thread: a batch joins the running ones between two steps, so while another batch is
    in flight the engine does not drain at a batch's end. It drives the engine with the
    pieces `LLM.generate` is made of: `make_requests` (validation), `outputs.add` (queueing),
    `step`, `request.output()`, `outputs.release`."""

    def __init__(self, model: str, llm_kwargs: dict):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        started = concurrent.futures.Future()
        # NOTE: the engine is built on the thread that steps it (CUDA's current device is per thread)
        self._thread = threading.Thread(target=self._main, args=(model, llm_kwargs, started),
                                        name="nanovllm-engine", daemon=True)
        self._thread.start()
        self.llm: LLM = started.result()  # re-raises a failed start (bad model, bad kwargs)

    def submit(self, prompts: list[Prompt], params: list[SamplingParams]) -> concurrent.futures.Future:
        """Queue one batch; the future gets `LLM.generate`'s result dicts, in order, or its exception."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop has stopped")
        future = concurrent.futures.Future()
        self._inbox.put(_Job(prompts, params, future))
        return future

    def close(self) -> None:
        """Fail the batches still running, stop the loop and free the engine."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join()

    def _main(self, model: str, llm_kwargs: dict, started: concurrent.futures.Future) -> None:
        try:
            llm = LLM(model, **llm_kwargs)
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(llm)
        try:
            self._run(llm)
        finally:
            llm.exit()

    def _run(self, llm: LLM) -> None:
        running: list[_Job] = []
        while True:
            jobs = self._take(block=not running)
            if _STOP in jobs:
                _fail(running + [job for job in jobs if job is not _STOP], RuntimeError("the engine loop was closed"))
                return
            try:
                running += [job for job in jobs if _start(llm, job)]
                if running:
                    llm.step()
                    running = [job for job in running if not _finish_if_done(llm, job)]
            except Exception as e:
                llm.abort_all()  # as generate does: every block freed, the engine usable
                _fail(running, e)
                running = []

    def _take(self, block: bool) -> list:
        """Everything queued now; with `block`, wait for at least one."""
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items


def _start(llm: LLM, job: _Job) -> bool:
    """Validate and queue a job's requests; False if it is already over (failed, empty, cancelled)."""
    if not job.future.set_running_or_notify_cancel():
        return False
    try:
        seqs = llm.make_requests(job.prompts, job.params)  # NOTE: a bad row fails its batch, not the loop
        if not seqs:
            job.future.set_result([])
            return False
        job.requests = llm.outputs.add(seqs)
    except Exception as e:
        job.future.set_exception(e)
        return False
    return True


def _finish_if_done(llm: LLM, job: _Job) -> bool:
    if not all(sample.seq.is_finished for request in job.requests for sample in request.samples):
        return False
    job.future.set_result([request.output() for request in job.requests])
    llm.outputs.release(job.requests)
    return True


def _fail(jobs: list[_Job], error: BaseException) -> None:
    for job in jobs:
        if not job.future.done():  # a job still in the inbox may have been cancelled
            job.future.set_exception(error)


class LLMPredictor:
    """A callable class for `Dataset.map_batches`: one engine per actor.

    `model`: an HF directory (or anything `LLM` takes); `sampling_params`: a SamplingParams
    or a dict of its fields, the default for every row (per-row `max_tokens`, `temperature`,
    `seed` columns override it); `prompt_column`: default `prompt`, else `token_ids`;
    every other keyword goes to `LLM(model, **llm_kwargs)`."""

    def __init__(self, model: str, sampling_params: SamplingParams | dict | None = None,
                 prompt_column: str | None = None, **llm_kwargs):
        self.sampling_params = sampling_params_from(sampling_params)
        self.prompt_column = prompt_column
        self.engine = EngineLoop(model, llm_kwargs)
        self._finalizer = weakref.finalize(self, self.engine.close)

    async def __call__(self, batch):
        # NOTE: an async generator, the form of async UDF every Ray Data >= 2.9 runs concurrently
        prompts, params = requests_from_batch(batch, self.sampling_params, self.prompt_column)
        outputs = await asyncio.wrap_future(self.engine.submit(prompts, params)) if prompts else []
        yield with_outputs(batch, outputs)

    def close(self) -> None:
        """Stop the engine now (otherwise done when the predictor is garbage-collected)."""
        self._finalizer()


def predict(ds, model: str, *, sampling_params: SamplingParams | dict | None = None,
            prompt_column: str | None = None, replicas: int = 1, tensor_parallel_size: int = 1,
            batch_size: int = DEFAULT_BATCH_SIZE, max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
            batch_format: str = "numpy", predictor: type = LLMPredictor, **llm_kwargs):
    """`ds` (a Ray Dataset) with the generation columns added, lazily: `replicas` engines, each
    on `tensor_parallel_size` GPUs (CPU processes when `device="cpu"` or the cluster has no
    GPU), `max_concurrent_batches` batches of `batch_size` rows in each engine at once.
    `batch_format="pyarrow"` passes the other columns through without a numpy round trip.
    `predictor`: the callable class each actor runs, built with LLMPredictor's arguments."""
    for name, value in (("replicas", replicas), ("tensor_parallel_size", tensor_parallel_size),
                        ("batch_size", batch_size), ("max_concurrent_batches", max_concurrent_batches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    ray = init_ray()  # what Ray Data would do when the dataset runs; the cluster's GPUs are needed now
    device = llm_kwargs.get("device")
    on_gpu = device != "cpu" and (device is not None or ray.cluster_resources().get("GPU", 0) > 0)
    # a CPU engine's tensor-parallel ranks are processes: one core each
    resources = {"num_gpus": tensor_parallel_size} if on_gpu else {"num_cpus": tensor_parallel_size}
    compute, remote_args = _actor_pool(ray, replicas, max_concurrent_batches)
    return ds.map_batches(
        predictor,
        fn_constructor_kwargs=dict(model=model, sampling_params=sampling_params, prompt_column=prompt_column,
                                   tensor_parallel_size=tensor_parallel_size, **llm_kwargs),
        compute=compute, batch_size=batch_size, batch_format=batch_format, **resources, **remote_args)


def init_ray(address: str | None = None, verbose: bool = False, **ray_init_kwargs):
    """`ray.init` (unless Ray is running: then its settings stand) and Ray Data's context,
    quietly unless `verbose`: no start-up INFO lines or token-authentication notice, no
    worker log lines on the console, no Ray Data execution logs. Returns the `ray` module."""
    import ray
    import ray.data

    if not ray.is_initialized():
        quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
        ray.init(address=address, **{**quiet, **ray_init_kwargs})
        if not verbose:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_data_context(ray)
    return ray


def quiet_data_context(ray):
    """Ray Data's context, made without the DeprecationWarnings (`use_push_based_shuffle`,
    `use_polars`, `use_arrow_tensor_v2`) that Ray 2.5x's own DataContext() raises when it
    sets those deprecated fields to their defaults; later get_current() calls reuse it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray.data.context")
        return ray.data.DataContext.get_current()


def _actor_pool(ray, replicas: int, max_concurrent_batches: int):
    """`replicas` actors running `max_concurrent_batches` tasks each at once: Ray >= 2.51 takes
    that as an ActorPoolStrategy argument, older Ray as the actor's `max_concurrency`."""
    try:
        return ray.data.ActorPoolStrategy(size=replicas, max_concurrent_calls_per_actor=max_concurrent_batches), {}
    except TypeError:
        return ray.data.ActorPoolStrategy(size=replicas), {"max_concurrency": max_concurrent_batches}
