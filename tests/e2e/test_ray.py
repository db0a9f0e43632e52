"""Batch inference on Ray Data. `LLMPredictor` run directly (no Ray needed): its column
contract, per-row sampling overrides and batches that overlap in one engine; then on a
local 2-CPU Ray cluster: 64 prompts through 2 replicas equal one in-process `LLM`, row by
row. Expected values come from `LLM.generate` on the same prompts."""
import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.integrations.columns import OUTPUT_COLUMNS
from nanovllm.integrations.ray import LLMPredictor
from tests.conftest import VOCAB
from tests.helpers import random_prompts

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=256)
GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = random_prompts([5 + (7 * i) % 30 for i in range(64)], VOCAB, seed=5)


def text(token_ids: list[int]) -> str:
    """The test tokenizer's text for these ids: word `t{i}` is token i."""
    return " ".join(f"t{t}" for t in token_ids)


def object_column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


async def collect(gen) -> list:
    return [out async for out in gen]


def run(predictor: LLMPredictor, batch):
    """One `map_batches` call, as Ray Data makes it: the async generator's single batch."""
    (out,) = asyncio.run(collect(predictor(batch)))
    return out


@pytest.fixture(scope="module")
def path(checkpoint) -> str:
    return checkpoint("qwen3")


@pytest.fixture(scope="module")
def llm(path):
    engine = LLM(path, **ENGINE)
    yield engine
    engine.exit()


@pytest.fixture(scope="module")
def predictor(path):
    p = LLMPredictor(path, sampling_params=GREEDY, **ENGINE)
    yield p
    p.close()


def reference(llm: LLM, prompts, **params) -> list[dict]:
    return llm.generate(prompts, SamplingParams(**{**GREEDY, **params}), use_tqdm=False)


def test_import_nanovllm_does_not_import_ray():
    code = ("import sys, nanovllm, nanovllm.batch, nanovllm.integrations.ray; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


# ---- the predictor, called directly ------------------------------------------------------
def test_numpy_batch_keeps_columns_and_adds_outputs(predictor, llm):
    prompts = PROMPTS[:5]
    batch = {"id": np.arange(5), "prompt": object_column([text(p) for p in prompts])}
    out = run(predictor, batch)
    expected = reference(llm, prompts)
    assert list(out) == ["id", "prompt", *OUTPUT_COLUMNS]
    assert out["id"].tolist() == [0, 1, 2, 3, 4] and out["prompt"].tolist() == batch["prompt"].tolist()
    assert [list(ids) for ids in out["generated_token_ids"]] == [e["token_ids"] for e in expected]
    assert out["generated_text"].tolist() == [e["text"] for e in expected]
    assert out["finish_reason"].tolist() == ["length"] * 5


def test_token_id_columns(path, predictor, llm):
    prompts = PROMPTS[5:9]
    expected = [e["token_ids"] for e in reference(llm, prompts)]
    # Arrow list columns arrive as an object array of int64 arrays
    out = run(predictor, {"token_ids": object_column([np.array(p) for p in prompts])})
    assert [list(ids) for ids in out["generated_token_ids"]] == expected
    # any column of int lists, named; equal lengths can arrive as a 2-D array
    same_length = [p[:5] for p in prompts]
    named = LLMPredictor(path, sampling_params=SamplingParams(**GREEDY), prompt_column="ids", **ENGINE)
    try:
        out = run(named, {"ids": np.array(same_length), "prompt": object_column(["ignored"] * 4)})
    finally:
        named.close()
    assert [list(ids) for ids in out["generated_token_ids"]] == [e["token_ids"] for e in reference(llm, same_length)]


def test_per_row_columns_override_sampling_params(predictor, llm):
    prompts = PROMPTS[10:14]
    batch = {"prompt": object_column([text(p) for p in prompts]),
             "max_tokens": np.array([2, np.nan, 9, 3]),           # NaN: the default (6)
             "temperature": np.array([0.0, 0.0, 1.0, np.nan])}
    if "seed" in SamplingParams.__dataclass_fields__:
        batch["seed"] = object_column([None, None, 7, None])
    out = run(predictor, batch)
    lengths = [len(ids) for ids in out["generated_token_ids"]]
    assert lengths == [2, 6, 9, 3]
    assert list(out["generated_token_ids"][0]) == reference(llm, prompts[:1], max_tokens=2)[0]["token_ids"]
    if "seed" in SamplingParams.__dataclass_fields__:  # a seeded row is reproducible in any batch
        seeded = reference(llm, prompts[2:3], max_tokens=9, temperature=1.0, seed=7)[0]["token_ids"]
        assert list(out["generated_token_ids"][2]) == seeded


def test_pandas_and_arrow_batches(predictor, llm):
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    prompts = PROMPTS[14:17]
    expected = [e["token_ids"] for e in reference(llm, prompts)]
    df = pd.DataFrame({"k": ["a", "b", "c"], "token_ids": prompts})
    out = run(predictor, df)
    assert isinstance(out, pd.DataFrame) and out["k"].tolist() == ["a", "b", "c"]
    assert [list(ids) for ids in out["generated_token_ids"]] == expected
    table = pa.table({"k": ["a", "b", "c"], "token_ids": prompts})
    out = run(predictor, table)
    assert out.column_names == ["k", "token_ids", *OUTPUT_COLUMNS]
    assert out.column("generated_token_ids").to_pylist() == expected
    assert out.column("token_ids").to_pylist() == prompts


def test_bad_batches_and_arguments(path, predictor):
    with pytest.raises(ValueError, match=r"no prompt column.*\['text'\]"):
        run(predictor, {"text": object_column(["t5"])})
    with pytest.raises(ValueError, match="row 1: max_tokens must be .*got 0"):
        run(predictor, {"prompt": object_column(["t5", "t6"]), "max_tokens": np.array([3, 0])})
    with pytest.raises(TypeError, match="row 0: column 'prompt' must hold strings or lists of int"):
        run(predictor, {"prompt": np.array([1.5])})
    with pytest.raises(ValueError, match=r"prompts\[0\] has token id 9999"):  # the engine's own check
        run(predictor, {"token_ids": object_column([[9999]])})
    with pytest.raises(TypeError, match="unknown sampling_params field.*'max_token'"):
        LLMPredictor(path, sampling_params=dict(max_token=3))
    with pytest.raises(ValueError, match="sampling_params.n must be 1 in a batch job"):
        LLMPredictor(path, sampling_params=SamplingParams(n=2))
    with pytest.raises(TypeError, match="unknown config keyword"):
        LLMPredictor(path, block_size=16)
    # a failed batch leaves the engine serving the next one
    assert len(run(predictor, {"prompt": object_column(["t5 t6"])})["generated_token_ids"][0]) == 6


def test_concurrent_batches_share_engine_steps(predictor, llm):
    """Two batches in flight join one running batch: fewer steps than one after the other."""
    engine = predictor.engine.llm
    steps = []
    step = engine.step

    def counting_step():
        steps.append(1)
        return step()

    engine.step = counting_step
    try:
        first = {"token_ids": object_column(PROMPTS[20:28])}
        run(predictor, first)
        alone = len(steps)
        steps.clear()
        second = {"token_ids": object_column(PROMPTS[28:36])}

        async def both():
            return await asyncio.gather(*[collect(predictor(b)) for b in (first, second)])
        outs = asyncio.run(both())
    finally:
        del engine.step
    assert len(steps) < 2 * alone - 2, f"{len(steps)} steps for two batches, {alone} for one"
    expected = [e["token_ids"] for e in reference(llm, PROMPTS[20:36])]
    assert [list(ids) for out in outs for ids in out[0]["generated_token_ids"]] == expected


# ---- on a local Ray cluster --------------------------------------------------------------
def test_two_replicas_equal_one_in_process_llm(ray_cluster, path, llm):
    ray = ray_cluster
    rows = [{"id": i, "prompt": text(p)} for i, p in enumerate(PROMPTS)]
    ds = ray.data.from_items(rows).repartition(8).materialize()
    ds = ds.map_batches(LLMPredictor, fn_constructor_kwargs=dict(model=path, sampling_params=GREEDY, **ENGINE),
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=8)
    out = sorted(ds.take_all(), key=lambda row: row["id"])
    expected = reference(llm, PROMPTS)
    assert [row["id"] for row in out] == list(range(64))
    assert [row["prompt"] for row in out] == [row["prompt"] for row in rows]
    assert [list(row["generated_token_ids"]) for row in out] == [e["token_ids"] for e in expected]
    assert [row["generated_text"] for row in out] == [e["text"] for e in expected]
    assert {row["finish_reason"] for row in out} == {"length"}
