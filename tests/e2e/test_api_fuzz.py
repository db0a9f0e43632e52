"""Random calls to the public API: `SamplingParams(...)`, `LLM(...)` and `llm.generate(...)`
with prompts of random types, parameters of random values (valid and not) and random
config keywords. Each call returns or raises one of the documented exceptions (ValueError,
TypeError, FileNotFoundError) within a deadline, never anything else; a rejected
`generate` names the first bad request and leaves the engine untouched, an accepted
one returns well-formed results, and the engine stays usable throughout."""
import signal
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sampling_batch import build_sampling_tensors
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler
from tests.conftest import VOCAB, fuzz_examples
from tests.e2e.test_invariance import assert_engine_is_empty

DOCUMENTED = (ValueError, TypeError, FileNotFoundError)
DEADLINE_SECONDS = 20   # a generate below takes milliseconds: anything near this is a hang
# 6 blocks of 16 under a max_model_len of 128: both length checks can fire (the default
# max_tokens of 64 fits a good prompt)
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=6, max_model_len=128, max_num_batched_tokens=32)
PROBE = ([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))


class Hang(BaseException):
    pass


@contextmanager
def deadline(seconds: float = DEADLINE_SECONDS):
    """Raise Hang in the main thread if the block runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise Hang(f"call did not return within {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call(fn, *args, **kwargs):
    """(result, None) or (None, the documented exception); anything else fails the test."""
    with deadline():
        try:
            return fn(*args, **kwargs), None
        except DOCUMENTED as e:
            return None, e


# ---- strategies -----------------------------------------------------------------------------

def mostly(good, bad, one_in: int):
    """`good`, except one draw in `one_in` from `bad`."""
    return st.integers(1, one_in).flatmap(lambda k: bad if k == 1 else good)


JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.binary(max_size=3), st.just([]), st.just({}),
                 st.just(object()), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70))
EDGE_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([-1, -0.0, 0, 1e-40, 1e-300, 1e-6, 1e5, 1e300, 2**70]))
# (hypothesis draws mostly small integers, even from wide bounds: name the large ones)
BIG_INTS = st.one_of(st.integers(-2**70, 2**70),
                     st.sampled_from([-1, 0, VOCAB, VOCAB + 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 2**70]))
UNHASHABLE = st.sampled_from([[], {}, ["cpu"], {"a": 1}])
SURROGATES_TOO = st.characters(codec=None, exclude_categories=())

SAMPLING_FIELDS = {  # name: (usually valid values, edge and invalid ones)
    "temperature": (st.sampled_from([0, 0, 0.5, 1.0, 1.5]), EDGE_NUMBERS),
    "top_p": (st.floats(0.05, 1.0), EDGE_NUMBERS),
    "min_p": (st.floats(0.0, 0.5), EDGE_NUMBERS),
    "repetition_penalty": (st.floats(0.5, 2.0), EDGE_NUMBERS),
    "presence_penalty": (st.floats(-2.0, 2.0), EDGE_NUMBERS),
    "frequency_penalty": (st.floats(-2.0, 2.0), EDGE_NUMBERS),
    "max_tokens": (st.integers(1, 12), BIG_INTS),
    "min_tokens": (st.integers(0, 3), BIG_INTS),
    "n": (st.integers(1, 3), st.integers(-2, 0)),
    "top_k": (st.sampled_from([-1, 0, 1, 5, VOCAB, VOCAB + 1]), BIG_INTS),
    "seed": (st.one_of(st.none(), st.integers(-2**40, 2**40)), BIG_INTS),
    "logprobs": (st.one_of(st.none(), st.integers(0, 5)), BIG_INTS),
    "ignore_eos": (st.booleans(), JUNK),
    "stop": (st.one_of(st.sampled_from(["t5", "t1", " t"]), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
             st.one_of(st.just(""), st.lists(st.text(max_size=2), max_size=2), JUNK)),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=2),
                       st.one_of(st.lists(BIG_INTS, max_size=2), JUNK)),
}


@st.composite
def sampling_kwargs(draw) -> dict:
    names = draw(st.lists(st.sampled_from(sorted(SAMPLING_FIELDS)), max_size=5, unique=True))
    kwargs = {}
    for name in names:
        good, bad = SAMPLING_FIELDS[name]
        kwargs[name] = draw(mostly(good, mostly(bad, JUNK, one_in=4), one_in=8))
    if draw(st.integers(0, 19)) == 0:
        kwargs["temprature"] = 0.5  # an unknown keyword
    return kwargs


def _params_or_default(kwargs: dict) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError):
        return SamplingParams(temperature=0, max_tokens=4)


PARAMS = sampling_kwargs().map(_params_or_default)
GOOD_PROMPT = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),                              # token ids
    st.lists(st.sampled_from([f"t{i}" for i in range(3, 40)]), min_size=1, max_size=30).map(" ".join),  # text
)
BAD_PROMPT = st.one_of(
    st.lists(st.one_of(st.integers(-2, VOCAB + 2), JUNK), max_size=6),     # bad ids and types, empty
    st.text(SURROGATES_TOO, max_size=12),                                   # any text: blank, lone surrogates
    st.lists(st.integers(3, VOCAB - 1), min_size=30, max_size=130),        # too long, for the cache or at all
    st.binary(max_size=4), JUNK,
)
PROMPT = mostly(GOOD_PROMPT, BAD_PROMPT, one_in=6)


@st.composite
def generate_args(draw):
    prompts = draw(st.one_of(st.lists(PROMPT, max_size=4), PROMPT, st.tuples(PROMPT, PROMPT)))
    count = len(prompts) if isinstance(prompts, (list, tuple)) else 1
    per_prompt = st.lists(mostly(PARAMS, JUNK, one_in=8), min_size=count, max_size=count)
    wrong = st.one_of(st.lists(PARAMS, max_size=4), JUNK)
    sampling_params = draw(mostly(st.one_of(st.none(), PARAMS, per_prompt), wrong, one_in=8))
    return prompts, sampling_params


# ---- SamplingParams ---------------------------------------------------------------------------

@settings(max_examples=fuzz_examples(400), deadline=None)
@given(kwargs=sampling_kwargs())
def test_sampling_params_accept_only_what_the_sampler_can_run(kwargs):
    params, error = call(SamplingParams, **kwargs)
    event("accepted" if error is None else f"rejected: {type(error).__name__}")
    if error is not None or params.logprobs is not None and params.logprobs > VOCAB:
        return  # (logprobs <= vocab is the engine's check: test_generate_fuzz)
    # an accepted request must run: its settings fit the sampler's tensors and give a token
    seq = Sequence([5, 6, 7], params)
    tensors = build_sampling_tensors([seq], frozenset({1}))
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    logits[0, 0] = -1e4  # token 0 is drawn only from a NaN distribution (or a near-uniform one)
    token = Sampler()(logits, tensors, torch.Generator().manual_seed(0)).token_ids.item()
    assert 0 < token < VOCAB or params.temperature >= 100, f"token {token}: an overflowed (NaN) distribution"
    if params.top_k > 0:
        # top-k comes after HF's repetition penalty over the prompt's ids (no output yet, so no
        # presence or frequency penalty) and after the ban of EOS and stop ids below min_tokens
        ranked = logits.clone()[0]
        seen = torch.tensor(sorted(set(seq.token_ids)))
        rep = params.repetition_penalty
        ranked[seen] = torch.where(ranked[seen] > 0, ranked[seen] / rep, ranked[seen] * rep)
        if params.min_tokens > 0:
            ranked[sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else {1}))] = float("-inf")
        assert token in ranked.topk(min(params.top_k, VOCAB)).indices.tolist()


# ---- LLM(...) --------------------------------------------------------------------------------

CONFIG_FIELDS = {  # name: (usually valid values, small enough to build an engine fast; edge and invalid ones)
    "max_num_batched_tokens": (st.integers(1, 300), st.integers(-1, 0)),
    "max_num_seqs": (st.integers(1, 64), st.integers(-1, 0)),
    "max_model_len": (st.integers(1, 300), st.integers(-1, 0)),
    "gpu_memory_utilization": (st.floats(0.1, 1.0), EDGE_NUMBERS),
    "tensor_parallel_size": (st.just(1), st.sampled_from([0, -1, 3, 5, 7])),  # 2 and 4 would spawn workers
    "enforce_eager": (st.booleans(), JUNK),
    "kvcache_block_size": (st.sampled_from([16, 32, 64, 256]), st.sampled_from([0, 8, 24, 48, 16.0])),
    "num_kvcache_blocks": (st.one_of(st.just(-1), st.integers(1, 40)), st.integers(-3, 0)),
    "cpu_kvcache_bytes": (st.integers(1 << 16, 1 << 22), st.integers(-1, 1 << 12)),
    "enable_prefix_caching": (st.booleans(), JUNK),
    "device": (st.sampled_from([None, "cpu"]), st.one_of(st.sampled_from(["cuda", "cuda:0", "tpu", "CPU", ""]),
                                                         UNHASHABLE)),
    "dtype": (st.sampled_from(["auto", "float32", "bfloat16"]), st.one_of(st.sampled_from(["fp8", "float64"]),
                                                                          UNHASHABLE)),
    "attention_backend": (st.sampled_from(["auto", "torch"]), st.one_of(st.sampled_from(["triton", "flash", "xla"]),
                                                                        UNHASHABLE)),
    "seed": (st.integers(-2**40, 2**40), st.sampled_from([-2**63 - 1, 2**64, 2**70])),
    "kv_cache_dtype": (st.sampled_from(["auto", "fp8"]), st.one_of(st.sampled_from(["int4", "float8", "FP8"]),
                                                                   UNHASHABLE)),
}


# a junk int here would be a valid size: a huge cache to allocate, or worker processes to spawn
NO_INT_JUNK = ("num_kvcache_blocks", "cpu_kvcache_bytes", "tensor_parallel_size")


@st.composite
def config_kwargs(draw) -> dict:
    names = draw(st.lists(st.sampled_from(sorted(CONFIG_FIELDS)), max_size=4, unique=True))
    kwargs = {}
    for name in names:
        good, bad = CONFIG_FIELDS[name]
        junk = JUNK.filter(lambda v: type(v) is not int) if name in NO_INT_JUNK else JUNK
        kwargs[name] = draw(mostly(good, mostly(bad, junk, one_in=4), one_in=3))
    if draw(st.integers(0, 19)) == 0:
        kwargs["max_num_seq"] = 4  # an unknown keyword
    return kwargs


@settings(max_examples=fuzz_examples(100), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=config_kwargs(), model=mostly(st.just("good"), st.sampled_from(["missing", "", None, 5]), one_in=6))
def test_llm_constructor(checkpoint, tmp_path, kwargs, model):
    path = {"good": checkpoint("qwen3"), "missing": str(tmp_path / "nowhere")}.get(model, model)
    try:
        llm, error = call(LLM, path, **kwargs)
    except RuntimeError as e:  # documented: a KV budget below one block
        assert "no memory left for the KV cache" in str(e) and "cpu_kvcache_bytes" in kwargs, e
        event("RuntimeError: KV budget below one block")
        return
    event("built an engine" if error is None else f"rejected: {type(error).__name__}")
    if error is not None:
        # the error names what is wrong: an unknown keyword, a config field, the model path
        assert any(name in str(error) for name in ["keyword", *CONFIG_FIELDS, "model", repr(path)]), repr(error)
        return
    try:
        outs, error = call(llm.generate, *PROBE, use_tqdm=False)
        if error is not None:  # only the probe's own size can be refused, by a tiny engine
            assert isinstance(error, ValueError) and "prompts[0]" in str(error), error
        else:
            assert len(outs[0]["token_ids"]) == 4
        assert_engine_is_empty(llm)
    finally:
        llm.exit()


# ---- llm.generate(...) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint("qwen3"), **ENGINE)
    yield engine
    engine.exit()


@pytest.fixture(scope="module")
def probe_expected(llm):
    return llm.generate(*PROBE, use_tqdm=False)[0]["token_ids"]


def is_one_prompt(prompts) -> bool:
    """A string, or a non-empty list of int token ids (bools are not ids), is one prompt; any
    other list is a list of prompts, each checked by itself."""
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                        and all(type(t) is int for t in prompts))


def first_bad_request(llm: LLM, prompts, sampling_params) -> tuple[type, str] | None:
    """The documented oracle: the error `generate` must raise for the first bad request
    (its type and the request it must name), or None if each request is fine by itself."""
    if is_one_prompt(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        return TypeError, "prompts"
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        sampling_params = [sampling_params or SamplingParams()] * len(prompts)
    if not isinstance(sampling_params, (list, tuple)):
        return TypeError, "sampling_params"
    if len(sampling_params) != len(prompts):
        return ValueError, "sampling params"
    for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
        if not isinstance(params, SamplingParams):
            return TypeError, f"sampling_params[{i}]"
        if isinstance(prompt, str):
            try:
                token_ids = llm.tokenizer.encode(prompt)
            except Exception:
                return ValueError, f"prompts[{i}]"
        elif isinstance(prompt, (list, tuple)) and all(type(t) is int for t in prompt):
            token_ids = prompt
        else:
            return TypeError, f"prompts[{i}]"
        if not token_ids or not all(0 <= t < VOCAB for t in token_ids):
            return ValueError, f"prompts[{i}]"
        total = len(token_ids) + params.max_tokens
        if total > ENGINE["max_model_len"] or -(-total // ENGINE["kvcache_block_size"]) > ENGINE["num_kvcache_blocks"]:
            return ValueError, f"prompts[{i}]"
        if (params.logprobs or 0) > VOCAB or any(t >= VOCAB for t in params.stop_token_ids):
            return ValueError, f"sampling_params[{i}]"
    return None


def check_outputs(outs: list[dict], prompts, sampling_params) -> None:
    if is_one_prompt(prompts):
        prompts = [prompts]
    assert len(outs) == len(prompts)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        sampling_params = [sampling_params or SamplingParams()] * len(prompts)
    for out, params in zip(outs, sampling_params):
        samples = out.get("outputs", [out])
        assert len(samples) == params.n
        for sample in samples:
            assert 1 <= len(sample["token_ids"]) <= params.max_tokens
            assert all(0 <= t < VOCAB for t in sample["token_ids"])
            assert sample["finish_reason"] in ("stop", "length") and isinstance(sample["text"], str)


@settings(max_examples=fuzz_examples(50), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=generate_args())
# a bool is an int to Python but not a token id: two prompts here, one sampling param (CI found it)
@example(args=([False, []], [SamplingParams(temperature=0.5, max_tokens=4)]))
def test_generate_fuzz(llm, probe_expected, args):
    prompts, sampling_params = args
    expected_error = first_bad_request(llm, prompts, sampling_params)
    bm = llm.block_manager
    free_before, cached_before = list(bm.free_block_ids), dict(bm.hash_to_block)
    outs, error = call(llm.generate, prompts, sampling_params, use_tqdm=False)
    event("generated" if error is None else f"rejected: {type(error).__name__}")
    assert_engine_is_empty(llm)
    if expected_error is None:
        assert error is None, f"rejected a good call: {error!r}"
        check_outputs(outs, prompts, sampling_params)
    else:
        exc_type, names = expected_error
        assert error is not None, f"accepted a call that should fail naming {names}"
        assert isinstance(error, exc_type) and names in str(error), \
            f"expected {exc_type.__name__} naming {names}: {error!r}"
        # rejected before any work: the free list keeps its order, the cache its entries
        assert list(bm.free_block_ids) == free_before and bm.hash_to_block == cached_before
    assert llm.generate(*PROBE, use_tqdm=False)[0]["token_ids"] == probe_expected


@pytest.mark.parametrize("field,value", [("temperature", 1e300), ("temperature", 1e-40), ("repetition_penalty", 1e300),
                                         ("repetition_penalty", 1e-40), ("top_k", 2**64)])
def test_values_the_sampler_cannot_represent_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_p_that_rounds_to_zero_keeps_the_top_token():
    params = SamplingParams(top_p=1e-300, seed=1)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    tensors = build_sampling_tensors([Sequence([5], params)], frozenset({1}))
    assert Sampler()(logits, tensors).token_ids.item() == logits.argmax().item()


@pytest.mark.parametrize("prompt", [b"abc", bytearray(b"ab")], ids=["bytes", "bytearray"])
def test_bytes_are_not_token_ids(llm, prompt):
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        llm.generate([[5, 6], prompt], PROBE[1], use_tqdm=False)


def test_untokenizable_text_names_its_request(llm):
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        llm.generate(["t5", "t6", "t7 \ud800"], PROBE[1], use_tqdm=False)


def test_a_huge_int_temperature_reaches_the_sampler():
    """Found by the fuzz test above: 2**70 is a valid float32 temperature but no int64."""
    tensors = build_sampling_tensors([Sequence([5], SamplingParams(temperature=2**70))], frozenset({1}))
    assert tensors.temperatures.tolist() == [float(2**70)]
