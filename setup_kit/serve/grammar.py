"""`response_format` (json_object, json_schema) honoured by constrained decoding, through xgrammar.

xgrammar compiles a JSON schema against the tokenizer's vocabulary once (cached per schema), and a
matcher per request then says, at every step, which tokens keep the reply inside the grammar: a
bitmask applied to that request's row of logits alone, so batch-mates sample as if it were not there.
When the JSON is complete only the end-of-turn tokens are left, so a reply that ends is valid JSON; one
cut by max_tokens ends with finish_reason "length", as OpenAI's does.

The grammar's vocabulary is the text each token puts in the reply: special and control tokens (the
chat template's, the tool-call markup's) put none, so they are never allowed inside the JSON, and the
end-of-turn tokens are the grammar's stop tokens.
"""

from __future__ import annotations

import json
import re
import threading

INSTALL_HINT = "pip install xgrammar (it comes with the kit's serve extra: pip install 'internlm-kit[serve]')"


# xgrammar's C++ errors begin "[10:31:17] /project/cpp/json_schema_converter.cc:5088: ": not the client's business.
_SOURCE_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """A response_format this server cannot turn into a grammar; the message is for the client."""


class Grammars:
    """One model's grammar compiler, built on first use (importing xgrammar and reading the vocabulary
    take a moment; servers that never see response_format never pay it)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._ed, self._surrogate_seconds = None, []  # byte tokens 0xED and 0xA0-0xBF (see Matcher)
        self._lock = threading.Lock()

    def compile(self, kind: str, schema: dict | None = None) -> JsonGrammar:
        """The grammar for json_object (any JSON object) or json_schema (that schema). Blocking:
        call it off the event loop. Compact JSON (no free whitespace: a weak model could otherwise
        spend its whole budget on blanks); in a schema's objects only the properties it names
        (xgrammar's strict mode: still valid against the schema, and what OpenAI's strict means)."""
        compiler = self._ensure()
        try:
            if kind == "json_object" or schema is None:
                compiled = compiler.compile_json_schema({"type": "object"}, any_whitespace=False,
                                                        strict_mode=False)
            else:
                compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                        strict_mode=True)
        except Exception as exc:  # xgrammar's own words for what it cannot compile
            reason = " ".join(_SOURCE_PREFIX.sub("", str(exc)).split()) or type(exc).__name__
            raise GrammarError(f"The JSON schema in response_format cannot be turned into a grammar for "
                               f"constrained decoding: {reason[:500]}. Simplify the schema, or send "
                               '{"type": "json_object"} for any JSON object.') from None
        return JsonGrammar(compiled, self._ed, self._surrogate_seconds)

    def _ensure(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise GrammarError("response_format needs constrained decoding, and this server's "
                                       f"Python has no xgrammar. Install it ({INSTALL_HINT}) and restart "
                                       "the server, or leave response_format out.") from None
                try:
                    info = self._tokenizer_info(xgr)
                except Exception as exc:  # a tokenizer xgrammar cannot read: this server cannot constrain
                    raise GrammarError(f"response_format needs constrained decoding, which cannot read this "
                                       f"model's tokenizer ({type(exc).__name__}: {exc}); leave "
                                       "response_format out.") from None
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
                vocab = self._tokenizer.get_vocab()
                self._ed = vocab.get("<0xED>")
                self._surrogate_seconds = [vocab[f"<0x{b:02X}>"] for b in range(0xA0, 0xC0)
                                           if f"<0x{b:02X}>" in vocab]
            return self._compiler

    def _tokenizer_info(self, xgr):
        tok = self._tokenizer
        # xgrammar reads the vocabulary's kind (byte fallback) and the dummy prefix from the tokenizer;
        # the vocabulary itself is ours: a token that puts no text in the reply is spelled "" (special).
        detected = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_ids)
        silent = set(getattr(tok, "all_special_ids", ())) | set(self._stop_ids)
        for token_id, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False):
                silent.add(int(token_id))
        raw_text = detected.vocab_type != xgr.VocabType.BYTE_LEVEL  # pieces spell their text as is
        vocab = [""] * self._vocab_size
        for piece, token_id in tok.get_vocab().items():
            if token_id >= self._vocab_size or token_id in silent or (raw_text and _puts_control_char(piece)):
                continue
            vocab[token_id] = piece
        return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=self._vocab_size,
                                 stop_token_ids=self._stop_ids, add_prefix_space=detected.add_prefix_space)


class JsonGrammar:
    """A compiled grammar; each request (each choice of n) gets its own matcher from it."""

    def __init__(self, compiled, ed: int | None = None, surrogate_seconds: list[int] = ()):
        self._compiled, self._ed, self._surrogate_seconds = compiled, ed, list(surrogate_seconds)

    def matcher(self) -> Matcher:
        return Matcher(self._compiled, self._ed, self._surrogate_seconds)


class Matcher:
    """One request's place in its grammar (engine thread only).

    xgrammar's strings admit UTF-8-encoded surrogates (byte 0xED, then 0xA0-0xBF), which are not UTF-8:
    a decoder shows them as three U+FFFD, which breaks a schema's maxLength. After a byte token 0xED the
    byte tokens that would start a surrogate are ruled out too (whole pieces are valid UTF-8 already).
    """

    def __init__(self, compiled, ed: int | None = None, surrogate_seconds: list[int] = ()):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
        self._ed, self._surrogate_seconds = ed, list(surrogate_seconds)
        self._after_ed = False

    def mask(self, logits, row: int) -> None:
        """Set every token the grammar does not allow next to -inf, in `logits[row]` only."""
        if self._matcher.is_terminated():
            return
        if self._matcher.fill_next_token_bitmask(self._bitmask):  # False: every token allowed
            view = logits[row:row + 1]
            self._xgr.apply_token_bitmask_inplace(view, self._bitmask.to(view.device))
        if self._after_ed and self._surrogate_seconds:
            logits[row, self._surrogate_seconds] = float("-inf")

    def accept(self, token: int) -> bool:
        """Advance past the sampled token; False if the grammar does not allow it (a bug here)."""
        if self._matcher.is_terminated():
            return True
        self._after_ed = token == self._ed
        return bool(self._matcher.accept_token(int(token)))


def _puts_control_char(piece: str) -> bool:
    """Whether a (byte-fallback) piece puts a raw U+0000-U+001F in the text. Compact JSON never holds
    one (RFC 8259 escapes them inside strings; no whitespace between tokens), so such tokens are
    left out of the grammar's vocabulary. That also closes a hole in xgrammar 0.2's strings with
    minLength/maxLength, which admit raw control characters (its issue 800)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16) < 0x20
        except ValueError:
            return False
    return any(ord(c) < 0x20 for c in piece)
