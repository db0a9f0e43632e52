"""Structured outputs without a model: the constraint's key-level checks in SamplingParams,
and the bitmask application against xgrammar's own CPU implementation."""
import json

import pytest
import torch

from nanovllm import SamplingParams
from nanovllm.layers.grammar_mask import GrammarMask, apply_grammar_mask, unpack_bitmask
from nanovllm.sampling_params import StructuredOutputs


def test_constraints_are_normalized():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    from_dict = SamplingParams(structured_outputs=dict(json=schema)).structured_outputs
    from_text = SamplingParams(structured_outputs=dict(json=json.dumps(schema))).structured_outputs
    assert from_dict == from_text == StructuredOutputs("json", json.dumps(schema))
    assert list(json.loads(from_dict.spec)["properties"]) == ["b", "a"]  # generation order kept
    assert SamplingParams(structured_outputs=dict(choice=["a", "b"])).structured_outputs == \
        StructuredOutputs("choice", ("a", "b"))
    assert SamplingParams(structured_outputs=dict(json_object=True)).structured_outputs.spec is None
    hash(SamplingParams(structured_outputs=dict(regex="a+")).structured_outputs)  # a cache key


def _nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("value, match", [
    (dict(jsn={}), "exactly one key of json, json_object, regex, choice, grammar"),
    (dict(regex="a", choice=["a"]), "exactly one key of"),
    (dict(), "exactly one key of"),
    (dict(choice=[]), r"structured_outputs\['choice'\] must be a non-empty list"),
    (dict(choice=["a", 3]), r"structured_outputs\['choice'\] must be a non-empty list"),
    (dict(json="{not json"), r"structured_outputs\['json'\] is not valid JSON"),
    (dict(json=[1, 2]), r"structured_outputs\['json'\] must be a JSON schema object"),
    (dict(json={"x": {1, 2}}), r"structured_outputs\['json'\] cannot be serialized"),
    (dict(json_object=False), r"structured_outputs\['json_object'\] must be True"),
    (dict(regex=""), r"structured_outputs\['regex'\] must be a non-empty string"),
    (dict(grammar=5), r"structured_outputs\['grammar'\] must be a non-empty string"),
    # a lone surrogate cannot reach the grammar compiler as UTF-8
    (dict(choice=["a", "\ud800"]), r"structured_outputs\['choice'\] must be .*UTF-8"),
    (dict(regex="a\ud800"), r"structured_outputs\['regex'\] must be .*UTF-8"),
    (dict(grammar='root ::= "\ud800"'), r"structured_outputs\['grammar'\] must be .*UTF-8"),
    (dict(json=_nested(2000)), r"structured_outputs\['json'\] is nested too deeply"),
    (dict(json="[" * 100_000 + "]" * 100_000), r"structured_outputs\['json'\] is nested too deeply"),
    ("json", "structured_outputs must be None or a dict"),
])
def test_bad_constraints_are_rejected_when_made(value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(structured_outputs=value)


def random_bitmask(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32, generator=g)


def test_unpack_matches_the_bit_layout():
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << 3
    bitmask[0, 1] = -2**31  # bit 31 of word 1: token 63
    assert unpack_bitmask(bitmask, 64)[0].nonzero().flatten().tolist() == [3, 63]


@pytest.mark.parametrize("vocab", [512, 1000])
def test_mask_matches_xgrammar_on_cpu(vocab):
    xgr = pytest.importorskip("xgrammar")
    logits = torch.randn(5, vocab)
    bitmask = random_bitmask(5, vocab)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask)
    got = logits.clone()
    apply_grammar_mask(got, GrammarMask(bitmask))
    assert torch.equal(got, want)
    # only some rows constrained: the others are untouched
    rows = torch.tensor([1, 3])
    got = logits.clone()
    apply_grammar_mask(got, GrammarMask(bitmask[rows], rows))
    assert torch.equal(got[rows], want[rows])
    assert torch.equal(got[[0, 2, 4]], logits[[0, 2, 4]])


def test_held_back_ids_are_cleared_unless_they_were_all_that_was_allowed():
    import numpy as np

    from nanovllm.engine.structured_output import _hold_back
    allowed = [{1, 5, 40}, {1, 2}, {1}, set()]   # rows; hold back ids 1 and 2 everywhere
    words = np.zeros((4, 2), dtype=np.uint32)
    for row, ids in enumerate(allowed):
        for t in ids:
            words[row, t // 32] |= np.uint32(1 << (t % 32))
    any_allowed = _hold_back(words, [(row, t) for row in range(4) for t in (1, 2)])
    got = [set(unpack_bitmask(torch.from_numpy(words.view(np.int32)), 64)[row].nonzero().flatten().tolist())
           for row in range(4)]
    assert got == [{5, 40}, {1, 2}, {1}, set()]
    assert any_allowed.tolist() == [True, True, True, False]   # the last row is a dead end
    assert _hold_back(words, []).tolist() == [True, True, True, False]
