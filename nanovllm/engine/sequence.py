"""One request's state as it moves through the scheduler."""
from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm.engine.structured_output import SequenceGrammar


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_seq_ids = count()


@dataclass(slots=True, eq=False)
class Sequence:
    """A request: its tokens, where their KV lives, and how much of it is computed.

    Invariant: `num_computed_tokens <= len(seq)`. Each step computes the tokens
    `[num_computed_tokens, len(seq))` (or a chunk of them); a step that brings
    `num_computed_tokens` up to `len(seq)` samples the next token. Decode is the
    case of one uncomputed token; prefill (also recompute after preemption) of many.

    `len(seq)` counts `num_pending_tokens` too: tokens sampled by launched steps whose
    ids have not reached the host yet (overlap scheduling). They follow `token_ids`;
    `token_ids` holds only known ids, and each pending token is appended when its step's
    output is processed."""
    token_ids: list[int]
    sampling_params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0   # tokens whose K/V are in the cache
    num_cached_tokens: int = 0     # of those, how many came from the prefix cache
    num_pending_tokens: int = 0    # sampled on the device, id not known on the host yet
    finish_reason: str | None = None
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it (vLLM's)
    grammar: "SequenceGrammar | None" = None   # structured outputs: its matcher, made when it first samples

    def __post_init__(self):
        self.token_ids = list(self.token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (len(self) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]
