"""Incremental detokenization and stop strings, on a byte-level tokenizer (one token per
byte, so multi-byte characters span tokens) driven through the real scheduler."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.sampling_batch import StepOutput
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.stop_checker import find_stop
from nanovllm.sampling_params import SamplingParams

TEXT = "héllo 世界 🙂! ok"


@pytest.fixture(scope="module")
def byte_tokenizer():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_deltas_never_split_a_character(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # multi-byte characters span tokens
    detok = IncrementalDetokenizer(byte_tokenizer)
    deltas = [detok.push([t]) for t in ids]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == detok.text == TEXT
    # each character is emitted by the token that completes it
    for i in range(len(ids)):
        full = byte_tokenizer.decode(ids[:i + 1])
        assert "".join(deltas[:i + 1]) == full.rstrip(REPLACEMENT_CHAR)


def test_flush_releases_an_incomplete_tail(byte_tokenizer):
    ids = byte_tokenizer.encode("a世")[:-1]  # the last character cut mid-way
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert "".join(detok.push([t]) for t in ids) == "a"
    assert detok.flush() == byte_tokenizer.decode(ids)[1:]
    assert detok.text == byte_tokenizer.decode(ids)


def test_find_stop():
    assert find_stop("abc def", 3, ("c d",)) == ("c d", 2)          # spans the old/new boundary
    assert find_stop("abc def", 2, ("abc",)) is None                 # ended before the new text
    assert find_stop("xx stop1 stop2", 14, ("stop2", "stop1")) == ("stop1", 3)   # earliest wins
    assert find_stop("aab", 1, ("ab", "aab")) == ("aab", 0)
    assert find_stop("abc", 0, ("c",)) is None


EOS = 256


def run(tokenizer, tokens: list[int], params: SamplingParams):
    """The engine's loop with a scripted model that emits `tokens` in order."""
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, 8, 256, 1024, frozenset({EOS}))
    proc = OutputProcessor(tokenizer, sched)
    [request] = proc.add([Sequence([5, 6, 7], params)], stream=True)
    script, deltas = iter(tokens), []
    while not sched.is_finished():
        batch = sched.schedule()
        sampled = {s.seq_id: next(script) for s, n in zip(batch.seqs, batch.num_scheduled_tokens)
                   if s.num_computed_tokens + n == len(s)}
        sched.postprocess(batch, sampled)
        proc.process(StepOutput(sampled, {}))
        deltas += proc.take_deltas()
    assert bm.num_free_blocks == bm.num_blocks
    return request.output(), deltas


@pytest.mark.parametrize("stop, expected", [("世界", "héllo "), ("o 世", "héll"), ("🙂!", "héllo 世界 "),
                                            ("never", TEXT)])
def test_stream_and_stop_strings_across_multibyte_tokens(byte_tokenizer, stop, expected):
    ids = byte_tokenizer.encode(TEXT)
    out, deltas = run(byte_tokenizer, ids + [EOS], SamplingParams(max_tokens=60, stop=[stop, "zzz"]))
    assert out["text"] == expected == "".join(d["text"] for d in deltas)
    assert all(REPLACEMENT_CHAR not in d["text"] for d in deltas)
    assert [t for d in deltas for t in d["token_ids"]] == out["token_ids"]
    if stop in TEXT:
        # stopped on the token that completed the match, not later
        end = TEXT.index(stop) + len(stop)
        assert out["token_ids"] == ids[:len(byte_tokenizer.encode(TEXT[:end]))]
        assert (out["finish_reason"], out["stop_reason"]) == ("stop", stop)
    else:
        assert out["token_ids"] == ids + [EOS] and (out["finish_reason"], out["stop_reason"]) == ("stop", None)
    assert deltas[-1]["finished"] and not any(d["finished"] for d in deltas[:-1])


def test_stop_string_wins_over_length_on_the_same_token(byte_tokenizer):
    ids = byte_tokenizer.encode("abcd")
    out, _ = run(byte_tokenizer, ids, SamplingParams(max_tokens=4, stop="cd"))
    assert (out["text"], out["finish_reason"], out["stop_reason"]) == ("ab", "stop", "cd")


def test_stop_token_adds_no_text(byte_tokenizer):
    ids = byte_tokenizer.encode("abc")
    out, deltas = run(byte_tokenizer, ids, SamplingParams(stop_token_ids=[ids[-1]]))
    assert out["token_ids"] == ids and out["text"] == "ab" == "".join(d["text"] for d in deltas)
    assert (out["finish_reason"], out["stop_reason"]) == ("stop", ids[-1])


def test_stop_strings_wait_for_min_tokens(byte_tokenizer):
    ids = byte_tokenizer.encode("abcabc")
    out, _ = run(byte_tokenizer, ids, SamplingParams(max_tokens=6, min_tokens=3, stop="b"))
    assert out["text"] == "abca" and out["token_ids"] == ids[:5] and out["stop_reason"] == "b"
