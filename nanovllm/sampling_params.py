"""Per-request sampling settings (vLLM's names and semantics), validated when the object is made."""
import json
import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, fields
from functools import cached_property
from numbers import Integral, Real

# OpenAI's (and vLLM's) range for presence_penalty and frequency_penalty
MAX_ABS_ADDITIVE_PENALTY = 2.0
# The sampler divides float32 logits by the temperature and the repetition penalty: below
# this a logit overflows to inf and the distribution turns NaN (vLLM samples greedily below
# 1e-5 too); far above it the value no longer fits a float32 (or flips every logit to -inf).
MIN_DIVISOR = 1e-5
MAX_REPETITION_PENALTY = 1e5    # 1 / MIN_DIVISOR, written out: 1 / 1e-5 is 99999.99999999999 in floats
FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1   # top_k travels in an int64 tensor
# Seeds are hashed modulo 2**64 (splitmix64): the int64 range keeps distinct seeds distinct
MIN_SEED, MAX_SEED = -2**63, 2**63 - 1
# Each of a prompt's n samples is a sequence made when the request is accepted: a bound keeps
# a typo (n=10**9) an error instead of an endless loop before any step runs
MAX_N = 2**16


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range
        return False


def _plain(x):
    """numpy (or other numbers-ABC) scalars -> Python int / float; anything else unchanged."""
    if type(x) in (bool, int, float):
        return x
    if isinstance(x, Integral):
        return int(x)
    if isinstance(x, Real):
        return float(x)
    return x


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        got = repr(value)  # NOTE: cut, so a 10**400 or a megabyte string stays a readable line
        raise ValueError(f"{name} must be {allowed}, got {got if len(got) <= 200 else got[:197] + '...'}")


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """One output constraint, normalized (hashable: compiled grammars are cached by it).

    `kind` is the key given; `spec` its value: the JSON schema serialized (key order kept:
    it is the order the fields are generated in), the regex or EBNF text, the choices as a
    tuple, or None for json_object. Whether it compiles is checked in `generate`."""
    kind: str
    spec: str | tuple[str, ...] | None

    @classmethod
    def from_dict(cls, d: Mapping) -> "StructuredOutputs":
        keys = list(d)
        _check(len(keys) == 1 and keys[0] in STRUCTURED_KINDS, "structured_outputs", dict(d),
               f"a dict with exactly one key of {', '.join(STRUCTURED_KINDS)}")
        kind, value = keys[0], d[keys[0]]
        name = f"structured_outputs[{kind!r}]"
        if kind == "json":
            return cls(kind, _schema_text(value, name))
        if kind == "json_object":
            _check(value is True, name, value, "True")
            return cls(kind, None)
        if kind == "choice":
            _check(isinstance(value, (list, tuple)) and value and all(_is_text(c) and c for c in value),
                   name, value, "a non-empty list of non-empty strings (UTF-8 text)")
            return cls(kind, tuple(value))
        _check(_is_text(value) and value.strip() != "", name, value, "a non-empty string (UTF-8 text)")
        return cls(kind, value)


def _is_text(x) -> bool:
    """A str the grammar compiler can take: encodable as UTF-8 (no lone surrogate such as '\\ud800')."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _schema_text(value, name: str) -> str:
    """A JSON schema (a dict, or a str holding one) as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from e
        except RecursionError as e:
            raise ValueError(f"{name} is nested too deeply to parse") from e
    _check(isinstance(value, dict), name, value, "a JSON schema object (a dict or a JSON string)")
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:  # a value JSON cannot hold, or a cycle
        raise ValueError(f"{name} cannot be serialized as JSON: {e}") from e
    except RecursionError as e:
        raise ValueError(f"{name} is nested too deeply to serialize as JSON") from e


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt's completion(s).

    The pipeline, per step: logprobs are read from the raw logits; then repetition /
    frequency / presence penalties, the min_tokens mask, temperature (0 = greedy argmax),
    top-k, top-p and min-p, in that order (HF's), and one draw from what is left.
    `stop` and `stop_token_ids` are normalized to tuples."""
    temperature: float = 1.0        # 0 = greedy (argmax)
    max_tokens: int = 64
    ignore_eos: bool = False
    _: KW_ONLY                      # the fields below are keyword-only
    n: int = 1                      # samples of the prompt; they share its KV blocks
    top_p: float = 1.0              # in (0, 1]: keep the smallest top set reaching p (1 = off)
    top_k: int = 0                  # keep the k most likely tokens (0 or -1 = off)
    min_p: float = 0.0              # in [0, 1]: drop tokens below min_p * the top probability
    seed: int | None = None         # per-request RNG: the same seed gives the same output in any batch
    min_tokens: int = 0             # EOS and stop ids are masked (stop strings ignored) until this many exist
    stop: tuple[str, ...] = ()      # output text ends before the first match (not included)
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None     # k: the sampled token's log-probability and the top-k alternatives
    repetition_penalty: float = 1.0   # HF: > 1 discourages every token of prompt + output
    presence_penalty: float = 0.0     # OpenAI: subtracted once from each token present in the output
    frequency_penalty: float = 0.0    # OpenAI: subtracted once per occurrence in the output
    # exactly one of json=<schema>, json_object=True, regex=, choice=[...], grammar=<EBNF>
    # (docs/structured-outputs.md); normalized to a StructuredOutputs
    structured_outputs: Mapping | StructuredOutputs | None = None

    def __post_init__(self):
        # normalize before validating: numpy scalars, a single stop string or a list are accepted
        for f in fields(self):
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(_plain(t) for t in self.stop_token_ids))
        self._check_sampling()
        self._check_lengths()
        self._check_stops()
        self._check_penalties()
        if isinstance(self.structured_outputs, Mapping):
            object.__setattr__(self, "structured_outputs", StructuredOutputs.from_dict(self.structured_outputs))
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs", self.structured_outputs,
               f"None or a dict with one key of {', '.join(STRUCTURED_KINDS)}")

    def _check_sampling(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", self.n, f"an integer in [1, {MAX_N}]")
        t = self.temperature
        _check(_is_number(t) and (t == 0 or MIN_DIVISOR <= t <= FLOAT32_MAX), "temperature", t,
               f"0 (greedy) or a number in [{MIN_DIVISOR}, {FLOAT32_MAX:.4g}]")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_int(self.top_k) and (0 <= self.top_k <= INT64_MAX or self.top_k == -1), "top_k", self.top_k,
               "-1 or 0 (off), or an integer in [1, 2**63 - 1]")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        # NOTE: sample k of n draws with seed + k
        _check(self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED - (self.n - 1)),
               "seed", self.seed, f"None or an integer in [-2**63, 2**63 - n] (n={self.n})")
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
               self.logprobs, "None or an integer >= 0")

    def _check_lengths(self) -> None:
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")

    def _check_stops(self) -> None:
        _check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
               self.stop, "a non-empty string or a list of non-empty strings")
        _check(isinstance(self.stop_token_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "a list of integer token ids >= 0")

    def _check_penalties(self) -> None:
        _check(_is_number(self.repetition_penalty)
               and MIN_DIVISOR <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
               "repetition_penalty", self.repetition_penalty, f"in [{MIN_DIVISOR}, {MAX_REPETITION_PENALTY:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and abs(value) <= MAX_ABS_ADDITIVE_PENALTY, name, value,
                   f"in [-{MAX_ABS_ADDITIVE_PENALTY}, {MAX_ABS_ADDITIVE_PENALTY}] (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @cached_property
    def sampler_settings(self) -> tuple:
        """The fields a step's sampling tensors take from every row: requests that differ only
        elsewhere (max_tokens, stop strings, n) share them, so a step builds them once."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.seed, self.min_tokens, self.logprobs,
                self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
