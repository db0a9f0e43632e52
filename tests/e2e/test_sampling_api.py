"""The request API end to end on a tiny random checkpoint: sampling equivalences, seeds,
stop strings and ids, min_tokens, penalties and logprobs against HF's logits, n samples
sharing prompt blocks, streaming, metrics. Expected values come from HF or from a
direct computation, never from our own earlier output."""
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from nanovllm import LLM, SamplingParams
from tests.conftest import VOCAB
from tests.helpers import TIE_TOL, assert_greedy_matches_hf, hf_logits, random_prompts

EOS = 1
BLOCK = 16


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("qwen3")


@pytest.fixture(scope="module")
def llm(path):
    engine = LLM(path, kvcache_block_size=BLOCK, max_model_len=512, num_kvcache_blocks=96)
    yield engine
    engine.exit()


@pytest.fixture(autouse=True)
def all_blocks_free_after(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm")
        assert engine.scheduler.is_finished()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        engine.block_manager.check_integrity([])


def generate(llm: LLM, prompts, params) -> list[dict]:
    return llm.generate(prompts, params, use_tqdm=False)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def assert_argmax(row: torch.Tensor, token: int, what: str) -> None:
    best = row.max().item()
    assert row[token].item() >= best - TIE_TOL, f"{what}: got {token}, argmax {row.argmax().item()}"


# ---- sampling equivalences and seeds ------------------------------------------------------
def test_greedy_equivalents_match_hf(llm, path):
    prompts = random_prompts([5, 20, 37], VOCAB, seed=11)
    base = generate(llm, prompts, greedy(8))
    for prompt, out in zip(prompts, base):
        assert_greedy_matches_hf(path, prompt, out["token_ids"])
    for kwargs in (dict(top_k=1, temperature=1.0), dict(top_p=1e-9, temperature=0.8, seed=5),
                   dict(top_k=1, top_p=0.5, min_p=0.3, temperature=2.0)):
        outs = generate(llm, prompts, SamplingParams(max_tokens=8, ignore_eos=True, **kwargs))
        assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in base], kwargs


def test_seeded_request_reproduces_in_any_batch(llm):
    p, q, r = random_prompts([9, 30, 3], VOCAB, seed=12)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=12, ignore_eos=True)
    alone = generate(llm, [p], seeded)[0]["token_ids"]
    others = [SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=20, seed=1, max_tokens=20, ignore_eos=True), greedy(3)]
    first = generate(llm, [p, q, r], [seeded, others[0], others[1]])[0]["token_ids"]
    last = generate(llm, [r, q, q, p], [others[2], others[1], others[0], seeded])[3]["token_ids"]
    assert first == alone and last == alone
    # not vacuous: another seed gives another completion
    other_seed = generate(llm, [p], SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=12,
                                                   ignore_eos=True))[0]["token_ids"]
    assert other_seed != alone


# ---- stops ----------------------------------------------------------------------------------
def test_stop_string_spanning_token_boundary(llm):
    prompt, other = random_prompts([7, 12], VOCAB, seed=13)
    base, other_base = generate(llm, [prompt, other], greedy(12))
    tokens = base["token_ids"]
    words = base["text"].split(" ")   # the test tokenizer: token i is the word "t{i}"
    stop = words[3][-2:] + " " + words[4][:2]                 # the end of token 3 and the start of token 4
    start = base["text"].index(stop)
    # the engine must stop on the first token whose text completes the match
    stop_at = next(m for m in range(1, len(tokens) + 1) if stop in llm.tokenizer.decode(tokens[:m]))
    out, other_out = generate(llm, [prompt, other], [greedy(12, stop=["never", stop]), greedy(12)])
    assert out["text"] == base["text"][:start]
    assert out["token_ids"] == tokens[:stop_at] and stop_at < len(tokens)
    assert (out["finish_reason"], out["stop_reason"]) == ("stop", stop)
    assert other_out["token_ids"] == other_base["token_ids"]   # its companion ran on


def test_stop_token_id(llm):
    prompt = random_prompts([6], VOCAB, seed=14)[0]
    tokens = generate(llm, [prompt], greedy(10))[0]["token_ids"]
    stop_id = tokens[2]
    first = tokens.index(stop_id)
    out = generate(llm, [prompt], greedy(10, stop_token_ids=[stop_id]))[0]
    assert out["token_ids"] == tokens[:first + 1]
    assert (out["finish_reason"], out["stop_reason"]) == ("stop", stop_id)
    assert out["text"] == llm.tokenizer.decode(tokens[:first])   # the stop token adds no text


def test_min_tokens_masks_stop_ids_against_hf(llm, path):
    prompt = random_prompts([6], VOCAB, seed=15)[0]
    stop_id = generate(llm, [prompt], greedy(1))[0]["token_ids"][0]   # what greedy says first
    out = generate(llm, [prompt], greedy(10, stop_token_ids=[stop_id], min_tokens=3))[0]
    completion = out["token_ids"]
    assert len(completion) >= 4 and stop_id not in completion[:-1]
    logits = hf_logits(path, prompt + completion)
    for step, token in enumerate(completion):
        row = logits[len(prompt) - 1 + step].clone()
        if step < 3:
            row[[stop_id, EOS]] = float("-inf")
        assert_argmax(row, token, f"step {step}")
    assert out["finish_reason"] == ("stop" if completion[-1] == stop_id else "length")


# ---- penalties and logprobs against HF --------------------------------------------------------
def penalized(row: torch.Tensor, history: list[int], num_prompt: int, params: SamplingParams) -> torch.Tensor:
    """HF's repetition penalty (its own processor), then OpenAI's frequency / presence."""
    row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([history]), row[None].clone())[0]
    output = history[num_prompt:]
    for token in set(output):
        row[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return row


def test_penalties_match_hf(llm, path):
    prompt = random_prompts([4], VOCAB, seed=16)[0]
    prompt = prompt + generate(llm, [prompt], greedy(6))[0]["token_ids"]   # a prompt the model likes to repeat
    params = greedy(10, repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4)
    completion = generate(llm, [prompt], params)[0]["token_ids"]
    logits = hf_logits(path, prompt + completion)
    changed = 0
    for step, token in enumerate(completion):
        raw = logits[len(prompt) - 1 + step]
        row = penalized(raw, prompt + completion[:step], len(prompt), params)
        assert_argmax(row, token, f"step {step}")
        changed += int(row.argmax() != raw.argmax())
    assert changed > 0, "the penalties never changed a choice: the test proves nothing"


def test_logprobs_match_hf(llm, path):
    prompt = random_prompts([11], VOCAB, seed=17)[0]
    params = SamplingParams(temperature=0.9, top_k=50, seed=3, logprobs=4, repetition_penalty=1.3, max_tokens=6,
                            ignore_eos=True)
    out = generate(llm, [prompt], params)[0]
    assert [e["token_id"] for e in out["logprobs"]] == out["token_ids"]
    raw = torch.log_softmax(hf_logits(path, prompt + out["token_ids"]), dim=-1)
    for step, entry in enumerate(out["logprobs"]):
        row = raw[len(prompt) - 1 + step]
        assert entry["logprob"] == pytest.approx(row[entry["token_id"]].item(), abs=1e-4)
        values, ids = row.topk(4)
        assert list(entry["top_logprobs"]) == ids.tolist()
        assert list(entry["top_logprobs"].values()) == pytest.approx(values.tolist(), abs=1e-4)
    zero = generate(llm, [prompt], greedy(2, logprobs=0))[0]
    assert [e["top_logprobs"] for e in zero["logprobs"]] == [{}, {}]
    assert "logprobs" not in generate(llm, [prompt], greedy(1))[0]


# ---- n samples share the prompt's blocks ------------------------------------------------------
def test_n_samples_share_prompt_blocks(llm):
    prompt = random_prompts([40], VOCAB, seed=18)[0]
    num_shared = (len(prompt) - 1) // BLOCK   # full blocks a later sample can hit
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    [request] = llm.outputs.add(llm.make_requests([prompt], params))
    num_prefill_tokens, seen_all_running = 0, False
    while not llm.scheduler.is_finished():
        _, num_prefill, _ = llm.step()
        num_prefill_tokens += num_prefill
        running = llm.scheduler.running
        llm.block_manager.check_integrity(running)
        if len(running) == 4 and all(s.num_completion_tokens > 0 for s in running):
            seen_all_running = True
            shared = running[0].block_table[:num_shared]
            assert all(s.block_table[:num_shared] == shared for s in running)
            assert all(llm.block_manager.blocks[b].ref_count == 4 for b in shared)
    llm.outputs.release([request])
    assert seen_all_running
    # the prompt was computed once; the other samples computed only its uncached tail
    assert num_prefill_tokens == len(prompt) + 3 * (len(prompt) - num_shared * BLOCK)
    out = request.output()
    assert len(out["outputs"]) == 4 and out["token_ids"] == out["outputs"][0]["token_ids"]
    for k, sample in enumerate(out["outputs"]):   # sample k draws with seed + k (vLLM's rule)
        alone = generate(llm, [prompt], SamplingParams(temperature=1.0, seed=7 + k, max_tokens=5, ignore_eos=True))
        assert sample["index"] == k and sample["token_ids"] == alone[0]["token_ids"]


# ---- streaming, metrics, validation ------------------------------------------------------------
def test_stream_adds_up_to_generate(llm):
    prompts = random_prompts([8, 3, 21], VOCAB, seed=19)
    stop = generate(llm, [prompts[2]], greedy(9))[0]["text"][6:11]
    params = [SamplingParams(temperature=0.8, seed=1, max_tokens=7, ignore_eos=True, n=2),
              greedy(5, logprobs=1), greedy(9, stop=stop)]
    outs = generate(llm, prompts, params)
    deltas = list(llm.stream(prompts, params))
    for i, out in enumerate(outs):
        for sample in out.get("outputs", [out]):
            k = sample.get("index", 0)
            mine = [d for d in deltas if (d["index"], d["sample_index"]) == (i, k)]
            assert "".join(d["text"] for d in mine) == sample["text"]
            assert [t for d in mine for t in d["token_ids"]] == sample["token_ids"]
            assert [d["finished"] for d in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1]["finish_reason"] == sample["finish_reason"]
    assert outs[2]["finish_reason"] == "stop" and outs[2]["stop_reason"] == stop
    assert [d["logprobs"][0] for d in deltas if d["index"] == 1] == outs[1]["logprobs"]


def test_stream_validates_eagerly_and_cleans_up_when_closed(llm):
    prompt = random_prompts([5], VOCAB, seed=20)[0]
    with pytest.raises(ValueError, match="logprobs"):
        llm.stream([prompt], greedy(3, logprobs=VOCAB + 1))
    assert llm.scheduler.is_finished()
    deltas = llm.stream([prompt, prompt], greedy(20))
    next(deltas)
    deltas.close()   # dropped mid-run: every block comes back (checked after the test)


def test_metrics(llm):
    outs = generate(llm, random_prompts([5, 9], VOCAB, seed=21), [greedy(1), greedy(6)])
    for out in outs:
        m = out["metrics"]
        assert 0 < m["time_to_first_token"] <= m["seconds"]
        assert m["time_per_output_token"] >= 0
    assert outs[0]["metrics"]["time_per_output_token"] == 0.0   # one token: no decode steps
    assert outs[1]["metrics"]["time_per_output_token"] > 0


@pytest.mark.parametrize("kwargs, field", [(dict(logprobs=VOCAB + 1), "logprobs"),
                                           (dict(stop_token_ids=[3, VOCAB]), "stop_token_ids")])
def test_engine_rejects_ids_outside_the_vocabulary(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate(llm, [[5, 6]], greedy(2, **kwargs))


@pytest.mark.cuda
def test_sampling_under_cuda_graphs(path):
    """The sampler runs outside the captured decode graph: greedy still matches HF and a
    seeded request reproduces across batch sizes (different graphs)."""
    engine = LLM(path, device="cuda", kvcache_block_size=BLOCK, max_model_len=512, num_kvcache_blocks=96)
    try:
        assert engine.model_runner.graphs is not None
        prompts = random_prompts([5, 9, 14], VOCAB, seed=22)
        for prompt, out in zip(prompts, engine.generate(prompts, greedy(8), use_tqdm=False)):
            assert_greedy_matches_hf(path, prompt, out["token_ids"])
        seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=9, max_tokens=10, ignore_eos=True)
        alone = engine.generate([prompts[0]], seeded, use_tqdm=False)[0]["token_ids"]
        mixed = engine.generate(prompts, [greedy(4), SamplingParams(top_k=5, max_tokens=12), seeded],
                                use_tqdm=False)
        assert engine.generate([prompts[0]], seeded, use_tqdm=False)[0]["token_ids"] == alone
        assert mixed[2]["token_ids"] != [] and len(mixed) == 3
    finally:
        engine.exit()
