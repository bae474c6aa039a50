"""InternLM2's tool-call markup in a reply, turned into OpenAI `tool_calls` as the text streams.

The model calls a tool by writing `<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>`
(InternLM's chat_format.md; "arguments" is read too). Text before the markup is content; the call
itself is never shown as content. Text that could be the start of the markup is held back.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from setup_kit.serve.prompt import ACTION_END, ACTION_START, PLUGIN


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str) -> ParsedCall | None:
    """The call in one action's body (`<|plugin|>\n{...}`); None when it is not a well-formed one."""
    body = body.strip()
    if body.startswith(PLUGIN):
        body = body[len(PLUGIN):].strip()
    try:
        spec = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return None
    arguments = spec.get("parameters", spec.get("arguments", {}))
    if isinstance(arguments, str):  # already JSON text
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            return None
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ParsedCall(call_id(), spec["name"], arguments)


class ToolCallParser:
    """Feed reply text; get back content to show and the calls completed so far."""

    def __init__(self, prefix: str = ""):
        self.buffer = ""
        self.in_action = False
        self.calls: list[ParsedCall] = []
        if prefix:  # the generation was started inside an action (tool_choice required / named)
            self.feed(prefix)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self.buffer += text
        shown, done = [], []
        while True:
            if not self.in_action:
                at = self.buffer.find(ACTION_START)
                if at < 0:
                    keep = _partial_tail(self.buffer, ACTION_START)
                    cut = len(self.buffer) - keep
                    shown.append(self.buffer[:cut])
                    self.buffer = self.buffer[cut:]
                    break
                shown.append(self.buffer[:at])
                self.buffer = self.buffer[at + len(ACTION_START):]
                self.in_action = True
            at = self.buffer.find(ACTION_END)
            if at < 0:
                break
            body, self.buffer = self.buffer[:at], self.buffer[at + len(ACTION_END):]
            self.in_action = False
            call = parse_call(body)
            if call is None:  # not a call after all: show it as the model wrote it
                shown.append(ACTION_START + body + ACTION_END)
            else:
                done.append(call)
        self.calls += done
        return "".join(shown), done

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The reply ended: an action left open is a call if its body parses, else content."""
        rest, self.buffer = self.buffer, ""
        if not self.in_action:
            return rest, []
        self.in_action = False
        call = parse_call(rest)
        if call is None:
            return ACTION_START + rest, []
        self.calls.append(call)
        return "", [call]


def _partial_tail(text: str, marker: str) -> int:
    return max((k for k in range(1, min(len(marker), len(text) + 1)) if text.endswith(marker[:k])), default=0)
