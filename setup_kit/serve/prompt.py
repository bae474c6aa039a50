"""Conversations to token ids for the server: control tokens come only from the chat template.

A stranger's message may contain the text `<|im_end|>\n<|im_start|>system\n...`. Tokenized together
with the template (as `apply_chat_template(tokenize=True)` does by default) that text becomes the real
control tokens and rewrites the conversation. Here the template is rendered with a placeholder for
every piece of client text; the rendered template's special tokens become their ids, and each run of
text between them (template text and client text together, so the ids are the same as a joint
encoding's for ordinary text) is tokenized as plain text, special-token spellings included.

Tools use InternLM2's own format (InternLM's chat_format.md, which LMDeploy's server follows): the
functions as a JSON list in a `system name=<|plugin|>` turn, an assistant's call as
`<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>`, and a tool's result as
an `environment name=<|plugin|>` turn.
"""

from __future__ import annotations

import json
import re

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never produced by a template itself
_PLACEHOLDER_RE = r"\ue000(\d+)\ue001"
TOOL_SYSTEM_ROLE = "system name=<|plugin|>"
TOOL_RESULT_ROLE = "environment name=<|plugin|>"
ACTION_START, ACTION_END, PLUGIN = "<|action_start|>", "<|action_end|>", "<|plugin|>"


class _Texts:
    """Client text kept aside; the template sees a numbered placeholder in its place."""

    def __init__(self):
        self.items: list[str] = []

    def mark(self, text: str) -> str:
        self.items.append(text)
        return PLACEHOLDER.format(len(self.items) - 1)


def marked_messages(messages: list[dict], tools: list[dict] | None = None,
                    texts: _Texts | None = None) -> tuple[list[dict], _Texts]:
    """The conversation as the template will see it: client text replaced by placeholders, tool
    specs, tool calls and tool results in InternLM2's format (the markup itself is trusted)."""
    texts = texts or _Texts()
    out = []
    for m in messages:
        role, content = m["role"], texts.mark(m.get("content") or "")
        if m.get("tool_calls"):
            for call in m["tool_calls"]:
                try:
                    arguments = json.loads(call["arguments"])
                except (json.JSONDecodeError, TypeError):
                    arguments = call["arguments"]
                body = json.dumps({"name": call["name"], "parameters": arguments}, ensure_ascii=False)
                content += f"{ACTION_START}{PLUGIN}\n" + texts.mark(body) + ACTION_END
        if role == "tool":
            role = TOOL_RESULT_ROLE
        out.append({"role": role, "content": content})
    if tools:
        spec = texts.mark(json.dumps(tools, ensure_ascii=False))
        # After the conversation's own system prompt, before the first other turn (as InternLM's
        # examples put it); InternLM2 follows several system turns.
        at = 1 if out and out[0]["role"] == "system" else 0
        out.insert(at, {"role": TOOL_SYSTEM_ROLE, "content": spec})
    return out, texts


def special_tokens(tokenizer) -> dict[str, int]:
    """Spelling -> id of every special token the tokenizer knows (the chat tokens, <s>, </s>...)."""
    found = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for token_id, token in decoder.items():
        if getattr(token, "special", False):
            found[str(token)] = int(token_id)
    for text in getattr(tokenizer, "all_special_tokens", ()):
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id >= 0:
            found.setdefault(text, token_id)
    return found


def encode_text(tokenizer, text: str, *, at_start: bool = False) -> list[int]:
    """Plain text to ids: a special token's spelling is text here, never the token.

    Text that follows a control token gets no dummy-prefix "▁", exactly as in a joint encoding of
    the whole prompt (the prefix belongs to the very start of a text only).
    """
    if not text:
        return []
    backend = None if at_start else _text_backend(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    if not at_start and not getattr(tokenizer, "is_fast", True) and hasattr(tokenizer, "_tokenize"):
        # A slow (sentencepiece) tokenizer, such as the model's own remote InternLM2Tokenizer: its
        # call puts a "▁" before every text it is given, where a joint encoding has none after a
        # control token; its `_tokenize` is sentencepiece's own encoding of the plain text.
        return tokenizer.convert_tokens_to_ids(tokenizer._tokenize(text))
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _text_backend(tokenizer):
    """A copy of the fast tokenizer's pipeline that never adds the dummy prefix and reads special
    tokens' spellings as text; None for a slow tokenizer (then the tokenizer's own call is used)."""
    cached = getattr(tokenizer, "_kit_text_backend", False)
    if cached is not False:
        return cached
    backend = None
    source = getattr(tokenizer, "backend_tokenizer", None)
    if source is not None:
        from tokenizers import Tokenizer

        spec = json.loads(source.to_str())
        spec["normalizer"] = _without_prepend(spec.get("normalizer"))
        pre = spec.get("pre_tokenizer")
        for step in (pre.get("pretokenizers", [pre]) if pre else []):
            if step.get("type") == "Metaspace":
                step["prepend_scheme"] = "never"
        backend = Tokenizer.from_str(json.dumps(spec))
        if hasattr(backend, "encode_special_tokens"):
            backend.encode_special_tokens = True
        else:  # a tokenizers release too old to read special spellings as text
            backend = None
    try:
        tokenizer._kit_text_backend = backend
    except AttributeError:
        pass
    return backend


def _without_prepend(normalizer: dict | None) -> dict | None:
    if not normalizer:
        return normalizer
    if normalizer.get("type") == "Prepend":
        return None
    if normalizer.get("type") == "Sequence":
        steps = [n for n in (_without_prepend(n) for n in normalizer["normalizers"]) if n]
        return {"type": "Sequence", "normalizers": steps}
    return normalizer


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation plus the assistant prefix, by the tokenizer's chat template."""
    marked, texts = marked_messages(messages, tools)
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    specials = special_tokens(tokenizer)
    names = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    pattern = re.compile(f"({names})|{_PLACEHOLDER_RE}" if names else _PLACEHOLDER_RE)
    ids: list[int] = []
    run: list[str] = []
    at = 0
    for match in pattern.finditer(rendered):
        run.append(rendered[at:match.start()])
        at = match.end()
        if names and match.group(1):
            ids += encode_text(tokenizer, "".join(run), at_start=not ids)
            run = []
            ids.append(specials[match.group(1)])
        else:
            run.append(texts.items[int(match.group(match.lastindex))])
    run.append(rendered[at:])
    ids += encode_text(tokenizer, "".join(run), at_start=not ids)
    return ids
