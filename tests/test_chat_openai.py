"""The `openai` engine: the same chat against any OpenAI-compatible server, over real HTTP."""

from __future__ import annotations

import threading
import time

import pytest

from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT, GenerationParams
from setup_kit.engines.openai_engine import OpenAIEngine, normalize_endpoint
from setup_kit.errors import KitError, UsageError
from setup_kit.session import Session


def test_endpoint_forms_all_mean_the_v1_api():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                "http://h:8000/v1/chat/completions"):
        assert normalize_endpoint(url) == "http://h:8000/v1"
    with pytest.raises(UsageError):
        normalize_endpoint("h:8000")


def test_streams_the_reply_and_reports_the_servers_token_counts(scripted_openai_server):
    engine = OpenAIEngine(scripted_openai_server.url)
    assert engine.model == "scripted-echo"  # the first model the server lists
    assert engine.context_window == 4096  # from the server's max_model_len
    pieces = list(engine.stream([{"role": "user", "content": "say  hi 你好"}],
                                GenerationParams(max_new_tokens=100)))
    assert len(pieces) > 1  # streamed, not one block
    assert "".join(pieces) == "echo: say  hi 你好"
    stats = engine.last_stats
    assert stats.stop == "eos"
    assert stats.completion_tokens == len(pieces)
    assert stats.prompt_tokens == len("say  hi 你好")  # the server's usage, not a guess
    assert 0 < stats.first_token_seconds <= stats.seconds


def test_sends_history_and_system_prompt_as_real_messages(scripted_openai_server):
    session = Session(OpenAIEngine(scripted_openai_server.url))
    session.send("first  question")
    session.send("second")
    sent = scripted_openai_server.requests[-1]
    assert sent["stream"] is True
    assert sent["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "first  question"},
        {"role": "assistant", "content": "echo: first  question"},
        {"role": "user", "content": "second"},
    ]


def test_greedy_and_limits_reach_the_server(scripted_openai_server):
    engine = OpenAIEngine(scripted_openai_server.url)
    params = GenerationParams(max_new_tokens=2, greedy=True, seed=7)
    text = "".join(engine.stream([{"role": "user", "content": "a long question"}], params))
    body = scripted_openai_server.requests[-1]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (2, 0.0, 7)
    assert text == "echo: "
    assert engine.last_stats.stop == "length"


def test_server_going_away_mid_reply_keeps_the_partial_reply(scripted_openai_server):
    scripted_openai_server.behaviour.die_after = 3
    session = Session(OpenAIEngine(scripted_openai_server.url))
    seen = []
    result = session.send("tell me everything", on_text=seen.append)
    assert "".join(seen) == "echo: tel"
    assert isinstance(result.error, KitError)
    assert "went away in the middle of the reply" in result.error.message
    assert result.reply == "echo: tel"
    assert session.history[-1] == {"role": "assistant", "content": "echo: tel"}
    assert result.stats.stop == "interrupt"
    # the session goes on once the server is back
    scripted_openai_server.behaviour.die_after = None
    assert session.send("again").reply == "echo: again"


def test_cancel_stops_a_slow_reply_at_once(scripted_openai_server):
    scripted_openai_server.behaviour.delay = 0.2
    engine = OpenAIEngine(scripted_openai_server.url)
    cancel = threading.Event()
    pieces = []
    started = time.monotonic()
    for piece in engine.stream([{"role": "user", "content": "x" * 60}], GenerationParams(), cancel):
        pieces.append(piece)
        if len(pieces) == 2:
            cancel.set()
    assert time.monotonic() - started < 2.0  # not the 4+ s the whole reply takes
    assert pieces == ["ech", "o: "]
    assert engine.last_stats.stop == "interrupt"


def test_no_server_is_a_clear_error_naming_the_address():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(KitError) as info:
        OpenAIEngine(f"http://127.0.0.1:{port}")
    assert f"127.0.0.1:{port}/v1" in info.value.message
    assert "serve" in info.value.fix


def test_unknown_model_is_the_servers_own_message(scripted_openai_server):
    engine = OpenAIEngine(scripted_openai_server.url, model="nope")
    session = Session(engine)
    result = session.send("hi")
    assert "HTTP 404" in result.error.message and "not found" in result.error.message
    assert result.reply == "" and session.history == []  # nothing arrived: nothing to keep
