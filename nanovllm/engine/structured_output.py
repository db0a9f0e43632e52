"""Structured outputs through xgrammar: each distinct constraint compiled once for the
tokenizer, one grammar matcher per sequence that follows its appended output tokens, and
each step's token bitmask of the constrained rows.

xgrammar is optional: it is imported when the first constrained request arrives."""
import json
import re

import numpy as np
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.grammar_mask import BITS_PER_WORD, GrammarMask
from nanovllm.sampling_params import SamplingParams, StructuredOutputs

PIP_HINT = 'pip install -e ".[structured]"'
# compact JSON: a tokenizer without a space token can still write every document
JSON_SEPARATORS = (",", ":")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "
_CPP_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError(f"structured_outputs needs the xgrammar package: {PIP_HINT}") from e
    return xgrammar


class SequenceGrammar:
    """One running sequence's matcher (freed when it finishes). Invariant: it has accepted
    exactly the sequence's known output tokens (`token_ids` past the prompt), so
    preemption and recompute, which append nothing, leave it as it is."""
    __slots__ = ("matcher", "num_accepted")

    def __init__(self, matcher):
        self.matcher = matcher
        self.num_accepted = 0


class GrammarManager:
    """Compiled grammars (cached by constraint, so 100,000 requests sharing one schema
    compile it once) and the per-step work on the constrained sequences."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size          # the logits' width: ids past the tokenizer's are never allowed
        self.eos_token_ids = eos_token_ids    # the grammars' stop tokens
        self._xgr = None                      # xgrammar, once a constrained request arrives
        self._compiler = None
        self._batch_matcher = None
        self._bitmasks: list[torch.Tensor] = []  # two pinned [rows, words] buffers, used in turn
        self._compiled: dict[StructuredOutputs, object] = {}
        self._dead_ends: set[int] = set()     # seq ids given EOS alone: the grammar could not go on

    def _init_xgrammar(self) -> None:
        xgr = import_xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=sorted(self.eos_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info)
        self._batch_matcher = xgr.BatchGrammarMatcher()
        self._xgr = xgr

    # ---- intake --------------------------------------------------------------------
    def check(self, i: int, params: SamplingParams) -> None:
        """Compile request i's constraint now (once per distinct constraint), so one that
        does not compile is a ValueError before any request runs."""
        constraint = params.structured_outputs
        if constraint is None or constraint in self._compiled:
            return
        if self._xgr is None:
            self._init_xgrammar()
        try:
            self._compiled[constraint] = self._compile(constraint)
        except RuntimeError as e:  # xgrammar's error for a bad schema, regex or grammar
            reason = _CPP_LOCATION.sub("", str(e).strip().splitlines()[0])
            raise ValueError(f"sampling_params[{i}]: structured_outputs {constraint.kind!r} does not compile: "
                             f"{reason}") from e

    def _compile(self, c: StructuredOutputs):
        # NOTE: no free whitespace in JSON (compact separators): a model cannot pad the
        # document with whitespace until max_tokens, and the output stays one line
        if c.kind == "json":
            return self._compiler.compile_json_schema(c.spec, any_whitespace=False, separators=JSON_SEPARATORS)
        if c.kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                      separators=JSON_SEPARATORS)
        if c.kind == "regex":
            return self._compiler.compile_regex(c.spec)
        if c.kind == "choice":  # JSON string literals are EBNF string literals
            return self._compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in c.spec))
        return self._compiler.compile_grammar(c.spec)

    def new_matcher(self, constraint: StructuredOutputs):
        """An xgrammar matcher at the start of `constraint` (which `check` compiled)."""
        return self._xgr.GrammarMatcher(self._compiled[constraint])

    def _grammar(self, seq: Sequence) -> SequenceGrammar:
        if seq.grammar is None:
            seq.grammar = SequenceGrammar(self.new_matcher(seq.sampling_params.structured_outputs))
        return seq.grammar

    # ---- each step -----------------------------------------------------------------
    @staticmethod
    def constrains(seqs: list[Sequence]) -> bool:
        return any(seq.sampling_params.structured_outputs is not None for seq in seqs)

    def advance(self, seqs: list[Sequence], sampled: dict[int, int]) -> list[tuple[Sequence, str]]:
        """Feed each constrained sequence the token just appended to it (`sampled`: seq_id
        -> token id). Returns the sequences to end and why: "stop" when the grammar
        accepted its stop token (also under ignore_eos or min_tokens), "abort" when the
        vocabulary could not continue the grammar (EOS was forced; the text is a prefix of
        a valid document)."""
        ended, accepting, tokens = [], [], []
        for seq in seqs:
            token_id = sampled.get(seq.seq_id)
            if token_id is None:
                continue
            if seq.seq_id in self._dead_ends:
                self._dead_ends.remove(seq.seq_id)
                ended.append((seq, "abort"))
            elif seq.grammar is not None and not seq.is_finished:  # EOS, a stop id or max_tokens may have ended it
                accepting.append(seq)
                tokens.append(token_id)
        if not accepting:
            return ended
        # one call into xgrammar for the whole batch: per-row calls cost ~5 us each in Python
        accepted = self._xgr.BatchGrammarMatcher.batch_accept_token([s.grammar.matcher for s in accepting], tokens)
        for seq, token_id, ok in zip(accepting, tokens, accepted):
            if not ok:
                raise RuntimeError(f"sequence {seq.seq_id}: its grammar rejected sampled token {token_id} "
                                   f"(this is a bug: the mask allowed it)")
            seq.grammar.num_accepted += 1
            if seq.grammar.matcher.is_terminated():
                ended.append((seq, "stop"))
        return ended

    def fill(self, seqs: list[Sequence]) -> GrammarMask | None:
        """The token bitmask of this step's constrained rows (`seqs`: the sequences that
        sample, in logits order; every earlier token of theirs is known). Rows that end
        (finished sequences, whose token is dropped) are left unmasked.

        Below min_tokens the row's EOS and stop ids are masked too, and EOS under
        ignore_eos, unless nothing else is allowed: a complete document then ends on EOS.
        A row with no token at all gets EOS alone, so no row ever samples from all -inf."""
        rows = [i for i, seq in enumerate(seqs) if seq.sampling_params.structured_outputs is not None
                and not seq.is_finished]
        if not rows:
            return None
        grammars = [self._grammar(seqs[i]) for i in rows]
        bitmask = self._bitmask(len(rows))   # [rows, words] int32
        self._batch_matcher.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
        words = bitmask.numpy().view(np.uint32)
        for j, i in enumerate(rows):
            assert grammars[j].num_accepted == seqs[i].num_completion_tokens, "the matcher lags the output"
        allowed = _hold_back(words, [(j, t) for j, i in enumerate(rows) for t in self._held_back(seqs[i])])
        for j in np.flatnonzero(~allowed):
            self._dead_ends.add(seqs[rows[j]].seq_id)
            eos = min(self.eos_token_ids, default=0)
            words[j, eos // BITS_PER_WORD] = np.uint32(1 << (eos % BITS_PER_WORD))
        return GrammarMask(bitmask, None if len(rows) == len(seqs) else torch.tensor(rows, dtype=torch.int64))

    def _bitmask(self, num_rows: int) -> torch.Tensor:
        """A [num_rows, words] int32 buffer for xgrammar to fill (it writes every word). On a GPU
        host it is pinned and reused: its copy to the device then needs no staging. Two buffers
        in turn, so a step's mask is never overwritten while its copy may still be in flight."""
        words = -(-self.vocab_size // BITS_PER_WORD)
        if not torch.cuda.is_available():
            return torch.empty(num_rows, words, dtype=torch.int32)
        if not self._bitmasks or self._bitmasks[0].shape[0] < num_rows:
            self._bitmasks = [torch.empty(num_rows, words, dtype=torch.int32).pin_memory() for _ in range(2)]
        self._bitmasks.reverse()
        return self._bitmasks[0][:num_rows]

    def _held_back(self, seq: Sequence) -> set[int]:
        """Ids the row may not sample while the grammar allows anything else: EOS and the
        stop ids below min_tokens, and EOS under ignore_eos (the constraint runs on)."""
        params = seq.sampling_params
        below_min = seq.num_completion_tokens < params.min_tokens
        return ((set(self.eos_token_ids) if below_min or params.ignore_eos else set())
                | (set(params.stop_token_ids) if below_min else set()))


def _hold_back(words: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Clear the (row, token id) bits of `pairs` in the [rows, words] uint32 bitmask, except
    in the rows where they were all that was allowed. Returns [rows] bool: whether each row
    allows any token (one scan of the mask serves both)."""
    if not pairs:
        return words.any(axis=1)
    rows, ids = np.asarray(pairs, dtype=np.int64).T
    cols, bits = ids // BITS_PER_WORD, np.left_shift(np.uint32(1), (ids % BITS_PER_WORD).astype(np.uint32))
    before = words[rows, cols]                                        # a copy (fancy indexing)
    np.bitwise_and.at(words, (rows, cols), ~bits)
    allowed = words.any(axis=1)
    emptied = ~allowed[rows]
    # NOTE: a word may appear twice; `before` holds its original value both times
    words[rows[emptied], cols[emptied]] = before[emptied]
    restored = np.unique(rows[emptied])  # rows held back to nothing: rescan them alone
    allowed[restored] = words[restored].any(axis=1)
    return allowed
