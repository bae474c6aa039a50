"""The one small interface every engine implements, and the values passed through it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

# The remote code's `meta_instruction`: the system prompt the tutorial's chat uses.
DEFAULT_SYSTEM_PROMPT = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文."
)

StopReason = Literal["eos", "length", "interrupt"]
Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class GenerationParams:
    max_new_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 0.8
    greedy: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_seconds: float = 0.0
    seconds: float = 0.0
    stop: StopReason = "eos"

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.seconds - self.first_token_seconds
        if self.completion_tokens <= 1 or decode_time <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_time


@runtime_checkable
class Engine(Protocol):
    name: str
    context_window: int  # tokens the model can attend to (prompt + reply)

    def describe(self) -> str:
        """One line for the banner: engine, device, dtype, model."""

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        """Tokens the chat template turns these messages into (with the assistant prefix)."""

    def stream(self, messages: list[Message], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply as text pieces that are always whole characters.

        Stops at end of turn, at `params.max_new_tokens`, or soon after `cancel` is set.
        When the iterator is exhausted, `last_stats` describes this reply.
        """

    @property
    def last_stats(self) -> GenerationStats: ...

    def close(self) -> None: ...


@dataclass
class EngineOptions:
    """What the user chose on the command line; engines read what applies to them."""

    model: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    endpoint: str | None = None
    api_key: str | None = None
    compile: bool = False
    extra: dict = field(default_factory=dict)
