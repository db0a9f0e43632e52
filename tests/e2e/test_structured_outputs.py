"""Structured outputs end to end on tiny random checkpoints. The oracles are independent of
our code: `jsonschema` validates JSON, `re.fullmatch` regexes, and a fresh xgrammar matcher
re-run over the output tokens checks grammars (and that a cut output is a valid prefix).

The main checkpoint has a byte-level BPE tokenizer (trained here, ~320 tokens) under a
512-wide model vocabulary, so the ids past the tokenizer must be masked out too."""
import json
import re

import pytest

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.engine import structured_output  # noqa: E402
from nanovllm.utils.random_checkpoint import make_random_checkpoint  # noqa: E402
from tests.conftest import variant_config  # noqa: E402
from tests.e2e.test_invariance import assert_engine_is_empty  # noqa: E402
from tests.e2e.test_overlap import count_deferred  # noqa: E402
from tests.helpers import needs_two_ranks  # noqa: E402

EOS = 1
TOKENIZER_VOCAB = 320
CORPUS = ['{"name": "Alice", "age": 30, "tag": "ab"}', '{"name": "Bob", "age": 7, "tags": ["x", "y"]}',
          "The quick brown fox jumps over the lazy dog.", "yes no maybe null true false 0123456789 -+.eE"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tag"],
          "properties": {"name": {"enum": ["Alice", "Bob", "Carol"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tag": {"type": "string", "maxLength": 3}}}
REGEX = r"(yes|no)-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe so"]
GRAMMAR = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
CONSTRAINTS = [dict(json=SCHEMA), dict(json=json.dumps(SCHEMA)), dict(json_object=True), dict(regex=REGEX),
               dict(choice=CHOICES), dict(grammar=GRAMMAR)]


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")


def make_byte_level_checkpoint(path: str, config: dict, **kwargs) -> str:
    make_random_checkpoint(path, config, with_tokenizer=False, **kwargs)
    byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_byte_level_checkpoint(str(tmp_path_factory.mktemp("byte-level")), variant_config("qwen3"), seed=0,
                                      init_range=0.5)


@pytest.fixture(scope="module")
def llm(path):
    engine = LLM(path, max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=128)
    yield engine
    engine.exit()


def prompts(n: int) -> list[str]:
    return [f"Extract the record {i}: {CORPUS[i % len(CORPUS)]}" for i in range(n)]


def constrained(constraint: dict, i: int, **kwargs) -> SamplingParams:
    """Greedy and seeded sampled requests alike (even i greedy)."""
    sampling = dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, seed=100 + i)
    return SamplingParams(**{"max_tokens": 32, "structured_outputs": constraint, **sampling, **kwargs})


def workload(num: int = 14) -> tuple[list[str], list[SamplingParams], list[dict]]:
    """Every kind of constraint, greedy and sampled, some with n = 2."""
    constraints = [CONSTRAINTS[i % len(CONSTRAINTS)] for i in range(num)]
    params = [constrained(c, i, n=1 + (i % 5 == 0)) for i, c in enumerate(constraints)]
    return prompts(num), params, constraints


def accepts(llm: LLM, constraint: dict, token_ids: list[int]) -> tuple[bool, bool]:
    """(every token accepted, the document complete), by a fresh matcher over the tokens."""
    params = SamplingParams(structured_outputs=constraint)
    llm.grammars.check(0, params)
    matcher = llm.grammars.new_matcher(params.structured_outputs)
    ok = all(matcher.accept_token(t) for t in token_ids)
    return ok, ok and matcher.is_completed()


def assert_valid(llm: LLM, constraint: dict, sample: dict) -> None:
    """A "stop" output is a whole valid document; any other is a valid prefix."""
    tokens, text = sample["token_ids"], sample["text"]
    stopped_on_eos = sample["finish_reason"] == "stop" and sample["stop_reason"] is None
    if stopped_on_eos:
        assert tokens[-1] == EOS
        tokens = tokens[:-1]
    ok, complete = accepts(llm, constraint, tokens)
    assert ok, f"{constraint}: {text!r} is not a prefix of a valid output"
    if not stopped_on_eos:
        return
    assert complete, f"{constraint}: {text!r} ended before the document did"
    kind, spec = next(iter(constraint.items()))
    if kind == "json":
        # NOTE: strict=False: xgrammar's JSON strings admit raw control characters (JSON wants them
        # escaped); everything else about the document is checked
        jsonschema.validate(json.loads(text, strict=False), spec if isinstance(spec, dict) else json.loads(spec))
    elif kind == "json_object":
        assert isinstance(json.loads(text, strict=False), dict)
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    elif kind == "choice":
        assert text in spec
    else:  # the grammar's language, written as a regex here
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", text), text


def samples(out: dict) -> list[dict]:
    return out.get("outputs", [out])


UNCONSTRAINED = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
NUM_UNCONSTRAINED = 3
PRESSURE = dict(kvcache_block_size=16, num_kvcache_blocks=12, max_num_batched_tokens=48)


def mixed_workload() -> tuple[list[str], list[SamplingParams], list[dict]]:
    """The constrained workload plus unconstrained greedy rows sharing its steps."""
    ps, params, constraints = workload()
    return (ps + prompts(NUM_UNCONSTRAINED), params + [UNCONSTRAINED] * NUM_UNCONSTRAINED,
            constraints + [None] * NUM_UNCONSTRAINED)


def full(out: dict) -> list[tuple]:
    return [(s["token_ids"], s["text"], s["finish_reason"], s["stop_reason"]) for s in samples(out)]


@pytest.fixture(scope="module")
def roomy(llm) -> list[dict]:
    """The mixed workload with room to spare (overlap on, the default)."""
    ps, params, _ = mixed_workload()
    outs = llm.generate(ps, params, use_tqdm=False)
    assert_engine_is_empty(llm)
    return outs


def test_every_output_satisfies_its_constraint(llm, roomy):
    _, _, constraints = mixed_workload()
    stopped = set()
    for out, constraint in zip(roomy, constraints):
        if constraint is None:
            continue
        for sample in samples(out):
            assert_valid(llm, constraint, sample)
            assert all(t < TOKENIZER_VOCAB for t in sample["token_ids"]), "an id past the tokenizer was sampled"
            if sample["finish_reason"] == "stop":
                stopped.add(json.dumps(constraint))
    # every bounded constraint closed a document (any JSON object may run to max_tokens)
    assert stopped >= {json.dumps(c) for c in CONSTRAINTS if "json_object" not in c}


@pytest.mark.parametrize("config", [dict(enable_overlap=False), PRESSURE], ids=["no-overlap", "preempting-chunked"])
def test_scheduling_changes_no_output(path, roomy, config):
    """Overlap off, or preemption and chunked prefill mid-generation: the matchers follow
    the appended tokens exactly, so every output (seeded sampled ones too) is the same."""
    ps, params, _ = mixed_workload()
    engine = LLM(path, max_model_len=256, **{"kvcache_block_size": 16, "num_kvcache_blocks": 128, **config})
    outs = engine.generate(ps, params, use_tqdm=False)
    if config is PRESSURE:
        assert engine.scheduler.num_preemptions > 0
    assert_engine_is_empty(engine)
    engine.exit()
    for i, (want, got) in enumerate(zip(roomy, outs)):
        assert full(got) == full(want), f"request {i}"


def test_unconstrained_rows_are_untouched(llm, roomy):
    alone = llm.generate(prompts(NUM_UNCONSTRAINED), UNCONSTRAINED, use_tqdm=False)
    assert [full(o) for o in alone] == [full(o) for o in roomy[-NUM_UNCONSTRAINED:]]


def test_min_tokens_stop_strings_and_max_tokens(llm):
    """min_tokens bans EOS until then unless the document is complete and only EOS can
    follow (it ends there, "stop"); a stop string cuts the text; max_tokens leaves a
    valid prefix ("length"); ignore_eos still ends when the grammar terminates."""
    choice = dict(choice=CHOICES)
    cases = [(dict(grammar=GRAMMAR), dict(min_tokens=10)), (choice, dict(min_tokens=10)),
             (dict(regex=REGEX), dict(stop="-")), (dict(json=SCHEMA), dict(max_tokens=4)),
             (choice, dict(ignore_eos=True))]
    params = [constrained(c, i, **kw) for i, (c, kw) in enumerate(cases)]
    outs = llm.generate(prompts(len(cases)), params, use_tqdm=False)
    for out, (constraint, kwargs) in zip(outs, cases):
        tokens = out["token_ids"]
        if "min_tokens" in kwargs:
            assert out["finish_reason"] == "stop" and tokens[-1] == EOS
            assert_valid(llm, constraint, out)
            if len(tokens) - 1 < kwargs["min_tokens"]:  # early: the grammar allowed nothing but EOS
                assert only_eos_allowed(llm, constraint, tokens[:-1]), out["text"]
        elif "stop" in kwargs:
            assert (out["finish_reason"], out["stop_reason"]) == ("stop", "-")
            assert out["text"] in ("yes", "no")
        elif "max_tokens" in kwargs:
            assert out["finish_reason"] == "length" and len(tokens) == 4
            assert_valid(llm, constraint, out)
        else:
            assert out["finish_reason"] == "stop" and tokens[-1] == EOS and out["text"] in CHOICES
    assert_engine_is_empty(llm)


def only_eos_allowed(llm: LLM, constraint: dict, token_ids: list[int]) -> bool:
    matcher = llm.grammars.new_matcher(SamplingParams(structured_outputs=constraint).structured_outputs)
    assert all(matcher.accept_token(t) for t in token_ids)
    bitmask = xgr.allocate_token_bitmask(1, llm.model_config.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    allowed = [t for t in range(llm.model_config.vocab_size) if bitmask[0, t // 32] >> (t % 32) & 1]
    return allowed == [EOS]


def test_dead_end_finishes_the_row(checkpoint):
    """A word-level vocabulary (`t{i}` tokens, no spaces) cannot continue "t9 t11" after
    t9, nor start "x": the row gets EOS alone and ends "abort", its text a valid prefix;
    never a draw from all -inf. n = 2 siblings run too."""
    llm = LLM(checkpoint("qwen3"), max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=64)
    params = [SamplingParams(temperature=0, max_tokens=8, n=2, structured_outputs=dict(choice=["t9 t11"])),
              SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True,
                             structured_outputs=dict(regex="x")),
              SamplingParams(temperature=0, max_tokens=8, structured_outputs=dict(choice=["t7", "t9"]))]
    outs = llm.generate([[5, 6, 7], [8, 9], [10, 11]], params, use_tqdm=False)
    dead = [(s["token_ids"], s["text"], s["finish_reason"]) for s in outs[0]["outputs"]]
    assert dead == [([9, EOS], "t9", "abort")] * 2
    assert (outs[1]["token_ids"], outs[1]["text"], outs[1]["finish_reason"]) == ([EOS], "", "abort")
    assert outs[2]["finish_reason"] == "stop" and outs[2]["text"] in ("t7", "t9")
    assert_engine_is_empty(llm)
    llm.exit()


def test_logprobs_come_from_the_unconstrained_distribution(checkpoint):
    from tests.helpers import hf_logits
    path = checkpoint("qwen3")
    llm = LLM(path, max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=64)
    prompt = [5, 6, 7, 8]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=2,
                                                structured_outputs=dict(choice=["t9"])), use_tqdm=False)[0]
    llm.exit()
    assert out["token_ids"] == [9, EOS]
    want = hf_logits(path, prompt).log_softmax(-1)[-1]   # [vocab]
    entry = out["logprobs"][0]
    assert entry["logprob"] == pytest.approx(want[9].item(), abs=1e-4)
    assert list(entry["top_logprobs"]) == want.topk(2).indices.tolist()


def test_bad_constraints_are_rejected_before_anything_runs(llm):
    """A constraint that does not compile names its request; a stream already running
    goes on unharmed and ends as it would have."""
    good = [constrained(dict(regex=REGEX), 0)]
    want = llm.generate(prompts(1), good, use_tqdm=False)
    stream = llm.stream(prompts(1), good)
    first = next(stream)
    bad = [dict(json={"type": "objectx"}), dict(regex="(unclosed"), dict(grammar='root ::= missing_rule')]
    for constraint in bad:
        with pytest.raises(ValueError, match=r"sampling_params\[1\]: structured_outputs .* does not compile"):
            llm.generate(prompts(2), good + [SamplingParams(structured_outputs=constraint)], use_tqdm=False)
    deltas = [first] + list(stream)
    assert sum((d["token_ids"] for d in deltas), []) == want[0]["token_ids"]
    assert "".join(d["text"] for d in deltas) == want[0]["text"]
    assert_engine_is_empty(llm)


def test_missing_xgrammar_is_an_import_error_with_the_pip_command(llm, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "xgrammar", None)
    grammars = structured_output.GrammarManager(llm.tokenizer, llm.model_config.vocab_size, frozenset({EOS}))
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[structured]"')):
        grammars.check(0, SamplingParams(structured_outputs=dict(regex="a")))


@needs_two_ranks
def test_tensor_parallel_masks_on_rank_0(path, llm):
    """Two ranks: rank 0 samples with the masks, the worker follows its ids."""
    params = [constrained(c, 0, max_tokens=16) for c in CONSTRAINTS[:1] + CONSTRAINTS[3:]] + [UNCONSTRAINED]
    want = llm.generate(prompts(len(params)), params, use_tqdm=False)
    tp2 = LLM(path, max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=128, tensor_parallel_size=2)
    try:
        got = tp2.generate(prompts(len(params)), params, use_tqdm=False)
    finally:
        tp2.exit()
    assert [full(o) for o in got] == [full(o) for o in want]


def test_constrained_steps_keep_overlap(llm, monkeypatch):
    """Constrained decodes still read their input ids from the previous step's sampled ids
    on the device: the host never waits for a step before launching the next forward."""
    deferred = count_deferred(monkeypatch)
    outs = llm.generate(prompts(2), [constrained(dict(grammar=GRAMMAR), i, ignore_eos=True) for i in range(2)],
                        use_tqdm=False)
    assert all(len(o["token_ids"]) > 2 for o in outs)
    assert sum(deferred) > 0
