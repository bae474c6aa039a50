"""One conversation: the messages, the generation settings, the context budget, save and load.

The session knows nothing about terminals. The REPL, `--prompt`, `--json` and the benchmarks drive
the same `Session.send`, so what they measure is what the user gets.

The system prompt is a real `system` message (the tutorial sent it as a fake first user turn), the
user's text is kept exactly as typed (the tutorial deleted every space), and every exchange is
appended to the history after the reply, also a reply cut short by Ctrl-C or by a server that went
away (the tutorial never appended anything, so the model forgot each turn).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from setup_kit.engines.base import (
    DEFAULT_SYSTEM_PROMPT,
    Engine,
    GenerationParams,
    GenerationStats,
    Message,
)
from setup_kit.errors import ChatError, ContextOverflow, KitError, UsageError

SAVE_FORMAT = "internlm-kit-chat"
SAVE_VERSION = 1
# Settings `/set` may change, and how to read a value typed for each.
def boolean(text: str) -> bool:
    """`/set greedy true`: true/false, on/off, yes/no, 1/0."""
    words = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


SETTABLE = {"temperature": float, "top_p": float, "max_new_tokens": int, "seed": int, "greedy": boolean}
KIND_WORDS = {int: ("a whole number", "512"), float: ("a number", "0.7"), boolean: ("true or false", "true")}
# `INTERNLM_KIT_CHAT_LOG=FILE`: append every message list sent to the engine as one JSON line.
LOG_ENV = "INTERNLM_KIT_CHAT_LOG"


@dataclass
class TurnResult:
    """What one `send` did: the exchange, its statistics, and what the budget had to drop."""

    user: str
    reply: str
    stats: GenerationStats
    dropped: int = 0  # messages dropped from the start of the history to make room
    error: KitError | None = None  # the engine failed part-way; `reply` is what arrived before

    def to_json(self) -> dict:
        """The object `chat --json` prints for each turn."""
        return {
            "user": self.user,
            "reply": self.reply,
            "prompt_tokens": self.stats.prompt_tokens,
            "completion_tokens": self.stats.completion_tokens,
            "seconds": round(self.stats.seconds, 4),
            "first_token_seconds": round(self.stats.first_token_seconds, 4),
            "stop": self.stats.stop,
        }


@dataclass
class Session:
    engine: Engine
    system: str | None = DEFAULT_SYSTEM_PROMPT
    params: GenerationParams = field(default_factory=GenerationParams)
    history: list[Message] = field(default_factory=list)  # user/assistant messages, oldest first
    last: TurnResult | None = None

    # -- the conversation -------------------------------------------------------------------

    def messages(self, pending: str | None = None) -> list[Message]:
        """What the engine sees: the system message, the history, and the new user message."""
        out: list[Message] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        out.extend(dict(m) for m in self.history)
        if pending is not None:
            out.append({"role": "user", "content": pending})
        return out

    def reset(self) -> None:
        """Forget the history; the system prompt and settings stay."""
        self.history.clear()
        self.last = None

    def send(self, text: str, *, on_text: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None) -> TurnResult:
        """Ask the engine for a reply to `text`, passing each piece to `on_text` as it arrives.

        The exchange joins the history when the reply ends, however it ends: a reply stopped by
        Ctrl-C or by an engine error keeps the text that arrived. One stopped before any text
        arrived keeps nothing, so the user can simply ask again. When the engine's server says the
        prompt does not fit its window, the oldest exchanges are dropped one at a time and the
        request is sent again, down to the system prompt and `text` alone.
        """
        kept = list(self.history)
        dropped, params = self._make_room(text)
        started = time.perf_counter()
        while True:
            pieces, error = self._stream(self.messages(text), params, on_text, cancel)
            if not isinstance(error, ContextOverflow):
                break
            if not self.history:
                self.history[:] = kept  # nothing was sent: the conversation stays as it was
                raise ChatError(
                    "This message does not fit the server's context window even with the rest "
                    f"of the conversation dropped: {error.message}",
                    fix="Send a shorter message, or ask for a shorter reply (--max-new-tokens N).",
                    chat_fix="Send a shorter message, or ask for a shorter reply "
                             "(/set max_new_tokens N).")
            dropped += self._drop_oldest()
        reply = "".join(pieces)
        stats = self._stats_after(error, started, len(pieces), cancel)
        stopped_before_any_text = not reply and (error is not None or stats.stop == "interrupt")
        if not stopped_before_any_text:
            self.history.append({"role": "user", "content": text})
            self.history.append({"role": "assistant", "content": reply})
        self.last = TurnResult(text, reply, stats, dropped, error)
        return self.last

    def _stream(self, messages: list[Message], params: GenerationParams,
                on_text: Callable[[str], None] | None,
                cancel: threading.Event | None) -> tuple[list[str], KitError | None]:
        """One request to the engine: the pieces that arrived, and the error that ended it."""
        _log_request(messages)
        pieces: list[str] = []
        try:
            for piece in self.engine.stream(messages, params, cancel):
                if cancel is not None and cancel.is_set():
                    continue  # after Ctrl-C: the engine stops at its next token, and nothing more is shown or kept
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
        except KitError as exc:
            return pieces, exc
        except Exception as exc:
            if "OutOfMemoryError" not in type(exc).__name__:
                raise  # a bug: let it show
            return pieces, KitError(
                f"The device ran out of memory during the reply ({exc}).".replace("\n", " "),
                fix="Lower max_new_tokens (/set max_new_tokens 256), forget old turns "
                "(/reset), or use a smaller dtype (--dtype fp16/bf16).")
        return pieces, None

    def _stats_after(self, error: KitError | None, started: float, pieces: int,
                     cancel: threading.Event | None) -> GenerationStats:
        if error is None:
            return self.engine.last_stats
        # The engine died mid-reply: its own statistics may be stale, so describe what we saw.
        stats = GenerationStats(completion_tokens=pieces, seconds=time.perf_counter() - started,
                                stop="error")
        engine_stats = self.engine.last_stats
        stats.prompt_tokens = engine_stats.prompt_tokens
        stats.first_token_seconds = engine_stats.first_token_seconds
        return stats

    # -- the context budget -----------------------------------------------------------------

    def _make_room(self, text: str) -> tuple[int, GenerationParams]:
        """Drop the oldest exchanges until prompt + reply fit the context window.

        Returns how many messages were dropped and the parameters for this reply (max_new_tokens
        is lowered only when even an empty history leaves less room than asked for).
        """
        window = self.engine.context_window
        wanted = self.params.max_new_tokens
        dropped = 0
        while True:
            prompt = self.engine.count_prompt_tokens(self.messages(text))
            if prompt + wanted <= window or not self.history:
                break
            dropped += self._drop_oldest()
        room = window - prompt
        if room <= 0:
            raise UsageError(
                f"This message and the system prompt come to {prompt} tokens, but the model's "
                f"context window is {window} tokens, so there is no room for a reply.",
                fix="Send a shorter message, or shorten the system prompt with /system TEXT.",
            )
        params = self.params
        if room < wanted:
            params = GenerationParams(**{**asdict(self.params), "max_new_tokens": room})
        return dropped, params

    def _drop_oldest(self) -> int:
        """Drop the oldest exchange; returns how many messages went.

        One exchange at a time, so the history never starts with an assistant message.
        """
        cut = 2 if len(self.history) >= 2 else 1
        del self.history[:cut]
        return cut

    def context_tokens(self) -> int:
        """Tokens the history and system prompt take now."""
        return self.engine.count_prompt_tokens(self.messages())

    # -- settings ---------------------------------------------------------------------------

    def set(self, name: str, value: str) -> object:
        """`/set NAME VALUE`: change one generation setting, checked like a command-line option."""
        kind = SETTABLE.get(name.replace("-", "_"))
        if kind is None:
            raise UsageError(f"There is no setting called {name!r}.",
                             fix=f"Use one of: {', '.join(SETTABLE)}.")
        name = name.replace("-", "_")
        try:
            parsed = kind(value)
        except ValueError:
            words, example = KIND_WORDS[kind]
            raise UsageError(f"{name} takes {words}, not {value!r}.",
                             fix=f"For example: /set {name} {example}") from None
        check_setting(name, parsed)
        setattr(self.params, name, parsed)
        if name == "temperature" and parsed > 0:
            self.params.greedy = False  # asking for a temperature means asking for sampling
        return parsed

    # -- save and load ----------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "system": self.system,
            "messages": [dict(m) for m in self.history],
            "params": {k: v for k, v in asdict(self.params).items() if k != "stop"},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation as JSON, atomically: an existing file is never left half-written."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise UsageError(f"{path} is a folder.", fix="Give a file name, e.g. /save chat.json")
        if not path.parent.is_dir():
            raise UsageError(f"The folder {path.parent} does not exist.",
                             fix="Create it first, or save somewhere else.")
        data = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Replace the conversation with one saved by `save` (system prompt and settings too)."""
        system, history, params = read_saved(path)
        self.system = system
        self.history = history
        for name, value in params.items():
            setattr(self.params, name, value)
        self.last = None


def check_setting(name: str, value) -> None:
    """The same limits the command-line options have."""
    bad = {
        "temperature": value < 0,
        "top_p": not 0 < value <= 1,
        "max_new_tokens": value < 1,
        "seed": value < 0,
    }.get(name, False)
    if bad:
        rule = {"temperature": ">= 0", "top_p": "in (0, 1]", "max_new_tokens": ">= 1",
                "seed": ">= 0"}[name]
        raise UsageError(f"{name} must be {rule}, not {value}.")


def read_saved(path: str | os.PathLike) -> tuple[str | None, list[Message], dict]:
    """Read and check a saved conversation; a bad file is a clear error, never a half-load."""
    path = Path(path).expanduser()
    fix = "Give a file written by /save (or `chat --json` output is not a saved chat)."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"There is no file {path}.", fix="Check the name; /save FILE writes one.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a saved chat: {exc}.", fix=fix) from None
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise UsageError(f"{path} is JSON, but not a chat saved by internlm-kit.", fix=fix)
    system = data.get("system")
    messages = data.get("messages")
    if (system is not None and not isinstance(system, str)) or not isinstance(messages, list):
        raise UsageError(f"{path} is damaged: 'system' or 'messages' has the wrong type.", fix=fix)
    history: list[Message] = []
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise UsageError(f"{path} is damaged: message {i + 1} is not a user or assistant "
                             "message with text.", fix=fix)
        history.append({"role": m["role"], "content": m["content"]})
    params = {}
    known = {f.name for f in fields(GenerationParams)} - {"stop"}
    saved = data.get("params") or {}
    if not isinstance(saved, dict):
        raise UsageError(f"{path} is damaged: 'params' is not an object of settings.", fix=fix)
    for name, value in saved.items():
        if name in known:
            if name in SETTABLE and not (value is None and name == "seed"):
                kind = SETTABLE[name]
                fits = (isinstance(value, bool) if kind is boolean else
                        isinstance(value, int) and not isinstance(value, bool) if kind is int else
                        isinstance(value, (int, float)) and not isinstance(value, bool))
                if not fits:
                    raise UsageError(f"{path} is damaged: the setting {name} is {json.dumps(value)}, but it "
                                     f"takes {KIND_WORDS[kind][0]}.", fix=f"Edit it in the file (e.g. "
                                     f"\"{name}\": {KIND_WORDS[kind][1]}), or /save a fresh one.")
                check_setting(name, value)
            params[name] = value
    return system, history, params


def _log_request(messages: list[Message]) -> None:
    target = os.environ.get(LOG_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(messages, ensure_ascii=False) + "\n")
