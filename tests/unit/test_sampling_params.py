"""SamplingParams validation: every out-of-range value is a ValueError naming its field."""
import dataclasses
import math

import numpy as np
import pytest

from nanovllm.sampling_params import SamplingParams

BAD_VALUES = {
    "n": [0, -1, 1.0, True, None, 2**16 + 1, 10**30],   # a huge n: an error, not endless sibling-making
    "temperature": [-0.1, math.inf, math.nan, "1", True, None, 10**400],   # 10**400: beyond float's range
    "top_p": [0, -0.5, 1.01, math.nan, "0.9", None, 10**400],
    "top_k": [-2, 1.5, True, None],
    "min_p": [-0.1, 1.1, math.nan, None, -10**400],
    "seed": [1.0, "7", True, 2**63, -2**63 - 1, 2**70],
    "max_tokens": [0, -3, 2.0, True, None],
    "min_tokens": [-1, 65, 1.0, None],         # 65 > the default max_tokens of 64
    "ignore_eos": [0, 1, "yes", None],
    "stop": ["", [""], ["ok", 3], 5, [None]],
    "stop_token_ids": [[-1], [1.0], [True], "3", 3],
    "logprobs": [-1, 1.5, True, "2"],
    "repetition_penalty": [0, -1.0, math.inf, math.nan, None, 10**400],
    "presence_penalty": [2.5, -2.01, math.nan, None, 10**400],
    "frequency_penalty": [-3, 2.0001, math.inf, None, -10**400],
    "structured_outputs": ["json", {}, {"jsn": {}}, {"regex": "a", "choice": ["a"]}],  # the rest: test_structured_outputs_unit
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in BAD_VALUES.items() for v in values],
                         ids=[f"{f}={v!r:.24}" for f, values in BAD_VALUES.items() for v in values])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got "):
        SamplingParams(**{field: value})


def test_every_field_is_validated():
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert names == set(BAD_VALUES)


@pytest.mark.parametrize("kwargs", [
    dict(n=4), dict(n=2**16), dict(temperature=0), dict(temperature=2.5), dict(top_p=1), dict(top_p=1e-9), dict(top_k=-1),
    dict(top_k=0), dict(top_k=50), dict(min_p=0), dict(min_p=1), dict(seed=0), dict(seed=-5), dict(seed=2**63 - 1), dict(seed=-2**63),
    dict(max_tokens=1, min_tokens=1), dict(logprobs=0), dict(logprobs=20), dict(stop=["a", "bc"]),
    dict(stop_token_ids=[0, 151643]), dict(repetition_penalty=0.5), dict(presence_penalty=-2),
    dict(frequency_penalty=2), dict(repetition_penalty=1e5), dict(repetition_penalty=1e-5),
])
def test_good_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(params, name) == expected


def test_numpy_scalars_become_python_numbers():
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), max_tokens=np.int64(5),
                            top_k=np.int32(3), stop_token_ids=[np.int64(7)], seed=np.uint64(2**63 - 1))
    assert (params.temperature, params.top_p, params.max_tokens, params.top_k) == (0.5, 0.9, 5, 3)
    assert params.stop_token_ids == (7,) and params.seed == 2**63 - 1
    assert all(type(v) in (int, float) for v in (params.temperature, params.top_p, params.max_tokens,
                                                   params.top_k, params.stop_token_ids[0], params.seed))


def test_seed_range_keeps_distinct_seeds_distinct():
    # the sampler hashes seeds modulo 2**64: beyond the int64 range two seeds could collide
    with pytest.raises(ValueError, match=r"seed must be None or an integer in \[-2\*\*63, 2\*\*63 - n\] \(n=2\)"):
        SamplingParams(seed=2**63 - 1, n=2)  # sample 1 would draw with seed 2**63
    assert SamplingParams(seed=2**63 - 2, n=2).seed == 2**63 - 2


def test_stop_is_normalized_to_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[5, 6]).stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a"]) == SamplingParams(stop=("a",))   # frozen, comparable, hashable
    hash(SamplingParams(stop=["a"], stop_token_ids=[1]))


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="best_of"):
        SamplingParams(best_of=2)


def test_positional_fields_keep_their_order():
    # temperature, max_tokens, ignore_eos stay positional; the rest are keyword-only
    assert SamplingParams(0.5, 10, True) == SamplingParams(temperature=0.5, max_tokens=10, ignore_eos=True)
    with pytest.raises(TypeError):
        SamplingParams(0.5, 10, True, 2)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0
