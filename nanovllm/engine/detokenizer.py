"""Incremental detokenization: the text of a growing token sequence, as deltas."""
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete multi-byte character


class IncrementalDetokenizer:
    """Each step decodes only a short tail window, never the whole sequence: the tokens of
    the previous delta (context: a token's spacing and byte merges depend on its
    neighbour) plus the new ones; the delta is the window's text past the context's.

    NOTE: a delta that ends in U+FFFD is held back (a token split a multi-byte
    character; a later token completes it); `flush` releases it at the end."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0   # window start: the context tokens begin here
        self._read_offset = 0     # tokens before this one are in `text`

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text they complete (possibly empty)."""
        self.token_ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release any held-back text (the sequence has ended)."""
        return self._advance(final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self.token_ids):
            return ""
        context = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.token_ids[self._prefix_offset:])
        if len(window) <= len(context) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        delta = window[len(context):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.text += delta
        return delta
