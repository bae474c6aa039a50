"""Incremental detokenization: turn a growing list of token ids into text, one safe piece at a time.

InternLM2's tokenizer falls back to bytes, so one character (a CJK character, an emoji) can span
several tokens. Decoding token by token prints U+FFFD halves; decoding the whole reply each step is
quadratic. Like the prefix/read offsets of text-generation-inference, we decode a small window and
hold back text while it ends in an incomplete character. A run of bytes that can never become valid
UTF-8 is let out as U+FFFD after a few tokens, and at `flush()`, so a stream never stalls or fails.
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes: after that many held tokens the bytes cannot complete.
MAX_HELD_TOKENS = 4


class IncrementalDecoder:
    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context (keeps leading spaces right)
        self._read = 0  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (maybe empty)."""
        self._ids.append(int(token_id))
        return self._emit(force=len(self._ids) - self._read > MAX_HELD_TOKENS)

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Whatever is still held, broken characters shown as U+FFFD."""
        return self._emit(force=True)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _emit(self, *, force: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if not force and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        if not after.startswith(before):
            # A decoder that rewrites earlier text (rare); fall back to the longest common prefix.
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            before = before[:common]
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]
