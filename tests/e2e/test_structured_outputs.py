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

EOS = 1
TOKENIZER_VOCAB = 320
CORPUS = ['{"name": "Alice", "age": 30, "tag": "ab"}', '{"name": "Bob", "age": 7, "tags": ["x", "y"]}',
          "The quick brown fox jumps over the lazy dog.", "yes no maybe null true false 0123456789 -+.eE"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tag"],
          "properties": {"name": {"enum": ["Alice", "Bob", "Carol"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tag": {"type": "string", "maxLength": 4}}}
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


def constrained(kind: int, i: int, **kwargs) -> SamplingParams:
    """Greedy and seeded sampled requests alike (even i greedy)."""
    sampling = dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, seed=100 + i)
    return SamplingParams(max_tokens=48, structured_outputs=CONSTRAINTS[kind], **{**sampling, **kwargs})


def workload(num: int = 24) -> tuple[list[str], list[SamplingParams], list[dict]]:
    """Every kind of constraint, greedy and sampled, some with n = 2."""
    kinds = [i % len(CONSTRAINTS) for i in range(num)]
    params = [constrained(k, i, n=1 + (i % 5 == 0)) for i, k in enumerate(kinds)]
    return prompts(num), params, [CONSTRAINTS[k] for k in kinds]


def accepts(llm: LLM, constraint: dict, token_ids: list[int]) -> tuple[bool, bool]:
    """(every token accepted, the document complete), by a fresh matcher over the tokens."""
    params = SamplingParams(structured_outputs=constraint)
    grammars = llm.grammars
    grammars.check(0, params)
    matcher = xgr.GrammarMatcher(grammars._compiled[params.structured_outputs])
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
    reasons = []
    for out, constraint in zip(roomy, constraints):
        if constraint is None:
            continue
        for sample in samples(out):
            assert_valid(llm, constraint, sample)
            assert all(t < TOKENIZER_VOCAB for t in sample["token_ids"]), "an id past the tokenizer was sampled"
            reasons.append(sample["finish_reason"])
    # the grammars close their documents: most end on EOS well before max_tokens
    assert reasons.count("stop") >= 0.75 * len(reasons), reasons


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
