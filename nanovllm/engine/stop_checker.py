"""Stop strings: found on the detokenized output text, across token boundaries."""
from typing import NamedTuple


class StopMatch(NamedTuple):
    stop: str     # the stop string that matched (vLLM's stop_reason)
    start: int    # where it starts in the text: the output ends here


def find_stop(text: str, num_new_chars: int, stops: tuple[str, ...]) -> StopMatch | None:
    """The earliest match of any stop string that ends within the last `num_new_chars`
    characters of `text` (earlier text was checked when it arrived). Ties go to the stop
    string listed first."""
    if not stops or num_new_chars <= 0:
        return None
    best = None
    for stop in stops:
        # a match ending in the new text starts at most len(stop) - 1 characters before it
        start = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if start != -1 and (best is None or start < best.start):
            best = StopMatch(stop, start)
    return best


def stop_buffer_length(stops: tuple[str, ...]) -> int:
    """Characters a stream holds back: a stop string may still match across them, and the
    output must end before it."""
    return max((len(s) for s in stops), default=1) - 1
