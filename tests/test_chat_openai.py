"""The `openai` engine: the same chat against any OpenAI-compatible server, over real HTTP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from fixtures.venvs import make_venv, pip_install, site_packages
from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT, GenerationParams
from setup_kit.engines.openai_engine import OpenAIEngine, normalize_endpoint
from setup_kit.errors import ChatError, KitError, UsageError
from setup_kit.repl import Terminal
from setup_kit.session import Session

EXE = str(Path(sys.executable).with_name("internlm-kit"))


def chat(*args: str, stdin: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`internlm-kit chat` as a user runs it, with its request log in tmp_path."""
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path), "NO_COLOR": "1",
           "INTERNLM_KIT_CHAT_LOG": str(tmp_path / "requests.jsonl")}
    return subprocess.run([EXE, "chat", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


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
    assert result.stats.stop == "error"
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


def test_the_kits_server_window_is_read_and_a_piped_chat_drops_old_turns_to_fit(kit_server,
                                                                                tmp_path):
    # The tiny model's window is 256 tokens; the default system prompt and two turns overflow it.
    assert OpenAIEngine(kit_server.url).context_window == kit_server.served.context_window == 256
    result = chat("--endpoint", kit_server.url, "--max-new-tokens", "4", "--greedy", "--json",
                  stdin="one\ntwo\n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["user"] for t in turns] == ["one", "two"]
    assert [t["stop"] for t in turns] in (["length", "length"], ["length", "eos"],
                                          ["eos", "length"], ["eos", "eos"])
    assert "dropped the 2 oldest messages" in result.stderr and "256-token" in result.stderr
    assert "error" not in result.stderr
    assert "--max-new-tokens N" in result.stderr and "/set" not in result.stderr  # piped
    sent = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [m["role"] for m in sent[-1]] == ["system", "user"]  # the system prompt was kept
    assert sent[-1][-1]["content"] == "two"


def test_a_context_length_refusal_drops_the_oldest_exchange_and_asks_again(
        scripted_openai_server):
    server = scripted_openai_server
    server.behaviour.context_window = 250  # one token per character
    server.behaviour.send_usage = False  # so our estimate stays rough and the server decides
    session = Session(OpenAIEngine(server.url), system="Be brief.",
                      params=GenerationParams(max_new_tokens=10))
    first = session.send("a" * 100)
    assert first.dropped == 0 and first.error is None
    second = session.send("b" * 120)  # 9 + 100 + 30 + 120 + 10 > 250: the server refuses
    assert second.error is None and second.reply.startswith("echo: bbb")
    assert second.dropped == 2
    refused, retried = server.requests[-2:]
    assert [m["role"] for m in refused["messages"]] == ["system", "user", "assistant", "user"]
    assert retried["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "b" * 120}]
    assert session.history == [{"role": "user", "content": "b" * 120},
                               {"role": "assistant", "content": second.reply}]


def test_a_message_too_long_even_alone_is_one_clear_error(scripted_openai_server, tmp_path):
    server = scripted_openai_server
    server.behaviour.context_window = 300
    session = Session(OpenAIEngine(server.url), system="Be brief.",
                      params=GenerationParams(max_new_tokens=10))
    session.send("hello")
    before = list(session.history)
    with pytest.raises(ChatError) as info:
        session.send("x" * 400)
    assert "does not fit the server's context window" in info.value.message
    assert "maximum context length is 300 tokens" in info.value.message  # the server's word
    assert "--max-new-tokens" in info.value.fix and "/set max_new_tokens" in info.value.chat_fix
    assert session.history == before  # nothing was answered, so nothing was forgotten

    result = chat("--endpoint", server.url, "--system", "Be brief.", "--prompt", "x" * 400,
                  stdin="", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "does not fit the server's context window" in result.stderr
    assert "--max-new-tokens" in result.stderr and "/set" not in result.stderr
    assert "Traceback" not in result.stderr


def test_another_refusal_is_a_failed_turn_with_advice_for_where_the_user_is(
        scripted_openai_server, tmp_path):
    server = scripted_openai_server
    server.behaviour.refuse = "top_p must be in (0, 1]"
    result = chat("--endpoint", server.url, "--json", stdin="hi\n", tmp_path=tmp_path)
    assert result.returncode == 1
    turn = json.loads(result.stdout)
    assert (turn["reply"], turn["stop"]) == ("", "error")
    assert "HTTP 400: top_p must be in (0, 1]" in result.stderr
    assert "--temperature" in result.stderr and "/set" not in result.stderr  # piped: no /set here
    assert "Traceback" not in result.stderr

    # The interactive chat names its own command for the same refusal.
    error = Session(OpenAIEngine(server.url)).send("hi").error
    shown = io.StringIO()
    Terminal(io.StringIO(), Console(file=shown, width=200), interactive=True).error(error)
    assert "HTTP 400" in shown.getvalue() and "(/set)" in shown.getvalue()


def test_tool_calls_from_a_kit_server_are_gathered_and_shown_readably(tool_server):
    """The kit's server parses the model's tool-call markup into OpenAI tool_calls deltas; the engine
    gathers them and the REPL prints each as name(arguments) after the text, in --json too."""
    from fixtures.servers import WEATHER_TOOL

    from setup_kit.repl import Repl

    engine = OpenAIEngine(tool_server.url, tools=[WEATHER_TOOL])
    out, err = io.StringIO(), io.StringIO()
    repl = Repl(Session(engine, system="Be brief."), Terminal(out=out, err=Console(file=err, width=200)))
    result = repl.turn("Weather in Paris?")
    assert result.reply == "Let me check." and result.error is None
    [call] = engine.last_tool_calls
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"} and call["id"]
    assert out.getvalue() == 'Let me check.\ntool call: get_weather({"city": "Paris"})\n'
    assert "chat runs no tools" in err.getvalue()

    as_json = Repl(Session(engine, system="Be brief."), Terminal(out=io.StringIO(), err=Console(file=io.StringIO()),
                                                                json=True))
    as_json.turn("Weather in Paris?")
    turn = json.loads(as_json.term.out.getvalue())
    assert turn["reply"] == "Let me check." and turn["tool_calls"] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    # a reply without calls shows none (the engine forgets the last reply's)
    plain = Repl(Session(OpenAIEngine(tool_server.url), system="Be brief."),
                 Terminal(out=io.StringIO(), err=Console(file=io.StringIO())))
    plain.turn("Weather in Paris?")
    assert "tool call" not in plain.term.out.getvalue()


@pytest.mark.slow
def test_a_kit_only_install_chats_with_an_endpoint_or_says_what_to_install(kit_core_venv, scripted_openai_server,
                                                                           tmp_path):
    # `pip install internlm-kit` alone has no torch: chat --endpoint must not need it (it used to die
    # setting torch's threads). What it does need (an HTTP client) it names with the command.
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path), "NO_COLOR": "1"}
    run = subprocess.run([str(kit_core_venv), "-m", "setup_kit", "chat", "--endpoint", scripted_openai_server.url,
                          "--prompt", "say hi"], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in run.stderr and "bug in internlm-kit" not in run.stderr, run.stderr
    assert run.returncode == 1 and "needs httpx" in run.stderr, run.stderr
    fix = next(line for line in run.stderr.splitlines() if "pip install" in line)
    assert f"{kit_core_venv} -m pip install" in fix
    # The fix as printed, in a copy of that venv (cached venvs are never changed), then the chat works.
    python = make_venv(tmp_path / "venv")
    (site_packages(python) / "kit-core.pth").write_text(str(site_packages(kit_core_venv)) + "\n")
    pip_install(python, "httpx")
    run = subprocess.run([str(python), "-m", "setup_kit", "chat", "--endpoint", scripted_openai_server.url,
                          "--prompt", "say hi"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "echo: say hi" in run.stdout and "Traceback" not in run.stderr
