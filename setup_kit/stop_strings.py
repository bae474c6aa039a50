"""Stop strings over streamed text: one implementation for `chat` (the native engine) and `serve`.

A reply ends just before the EARLIEST place where any stop string occurs, whatever the order the
stops were given in (OpenAI's semantics). Text that could still grow into a stop string is held
back, so a client never sees the start of a stop that later completes.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Take new text; (text safe to show now, whether a stop string ended the reply)."""
        if not self.stops:
            return text, False
        self.pending += text
        hit = self._earliest_hit()
        held = self._held_from()
        if hit is not None and (held is None or hit <= held):
            # No stop that is still growing could start before this one: it is the earliest.
            out, self.pending = self.pending[:hit], ""
            return out, True
        cut = len(self.pending) if held is None else held
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> tuple[str, bool]:
        """The reply ended: (the held text, cut at a stop string if one is complete in it)."""
        hit = self._earliest_hit()
        out = self.pending if hit is None else self.pending[:hit]
        self.pending = ""
        return out, hit is not None

    def _earliest_hit(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_from(self) -> int | None:
        """Where the longest tail that is a proper prefix of some stop string begins, if any."""
        longest = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                       if self.pending.endswith(s[:k])), default=0)
        return len(self.pending) - longest if longest else None
