"""Incremental detokenization: turn a growing list of token ids into text, one safe piece at a time.

InternLM2's tokenizer falls back to bytes, so one character (a CJK character, an emoji) can span
several tokens. Decoding token by token prints U+FFFD halves; decoding the whole reply each step is
quadratic. Like the prefix/read offsets of text-generation-inference, we decode a small window and
hold back text while it ends in an incomplete character. A run of bytes that can never become valid
UTF-8 is let out as U+FFFD after a few tokens, and at `flush()`, so a stream never stalls or fails.
"""

from __future__ import annotations

import codecs
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
        self._context: list[int] = []  # a shown token decoded before the window, for spacing
        self._bytes: dict[int, int | None] = {}  # token id -> the byte it stands for, if any
        # Skipped special tokens never enter the window: the stream reads as if they were not
        # there, which is what decode(skip_special_tokens=True) spells, but without letting the
        # tokenizer merge the byte runs on either side of one (it would turn a broken byte and the
        # valid ones after it into U+FFFD together).
        self._hidden = set(getattr(tokenizer, "all_special_ids", ())) if skip_special_tokens else set()

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (maybe empty)."""
        token_id = int(token_id)
        if token_id in self._hidden:
            return ""
        out = ""
        byte = self._byte(token_id)
        if byte is not None:
            # The tokenizer's byte fallback turns a whole run of byte tokens into U+FFFD when any
            # of it is invalid, which would swallow a valid byte (a newline) after a broken one.
            # So a new byte never shares a decode window with bytes already shown, nor with held
            # bytes it cannot complete: those are let out first, as U+FFFD.
            held = self._ids[self._read:]
            if not held:
                if self._ids and self._byte(self._ids[-1]) is not None:
                    self._fresh_window()
            elif not self._completes(held, byte):
                out = self._emit(force=True)
                self._fresh_window()
        self._ids.append(token_id)
        return out + self._emit(force=len(self._ids) - self._read > MAX_HELD_TOKENS)

    def _fresh_window(self) -> None:
        """Decode from the next token on, after the last shown non-byte token for context (so a
        leading space is decoded as it is mid-sentence, not stripped as at the start of text)."""
        self._prefix = self._read
        self._context = next(([t] for t in reversed(self._ids[:self._read])
                              if self._byte(t) is None), [])

    def _byte(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece (`<0xE4>`) stands for; None for any other token."""
        if token_id not in self._bytes:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            is_byte = (isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x")
                       and piece.endswith(">"))
            self._bytes[token_id] = int(piece[3:5], 16) if is_byte else None
        return self._bytes[token_id]

    def _completes(self, held: list[int], byte: int) -> bool:
        """Whether the held tokens are bytes that `byte` continues towards a valid character."""
        held_bytes = [self._byte(t) for t in held]
        # Only the byte run at the end of what is held can be continued (a held "▁" before it,
        # not yet shown, must not hide a broken run from this check).
        while held_bytes and held_bytes[0] is None:
            held_bytes.pop(0)
        if not held_bytes or any(b is None for b in held_bytes):
            return True  # no byte run at the end: the normal hold-back rules apply
        try:
            codecs.getincrementaldecoder("utf-8")().decode(bytes(held_bytes + [byte]), final=False)
        except UnicodeDecodeError:
            return False
        return True

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Whatever is still held, broken characters shown as U+FFFD."""
        return self._emit(force=True)

    def _emit(self, *, force: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._context + self._ids[self._prefix:self._read])
        after = self._decode(self._context + self._ids[self._prefix:])
        if not force and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        if not after.startswith(before):
            # A decoder that rewrites earlier text (rare); fall back to the longest common prefix.
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            before = before[:common]
        self._prefix, self._read = self._read, len(self._ids)
        self._context = []
        return after[len(before):]
