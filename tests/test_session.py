"""The conversation itself, on the native engine and the tiny model: what the engine is sent,
what the history keeps, the context budget, settings, save and load."""

from __future__ import annotations

import json
import threading

import pytest

from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT, GenerationParams
from setup_kit.errors import UsageError
from setup_kit.session import Session


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir, tmp_path_factory):
    from setup_kit.engines.native import NativeEngine

    with pytest.MonkeyPatch.context() as patch:  # the tokenizer cache goes to a temporary folder
        patch.setenv("INTERNLM_KIT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        engine = NativeEngine(tiny_internlm2_dir, device="cpu", dtype="fp32")
    yield engine
    engine.close()


def greedy(n: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, greedy=True)


def test_the_system_prompt_is_a_real_system_message(engine):
    session = Session(engine)
    assert session.messages("hi") == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                      {"role": "user", "content": "hi"}]
    rendered = engine.tokenizer.decode(engine.encode_chat(session.messages("hi")))
    assert rendered.startswith("<s><|im_start|>system\nYou are an AI assistant")
    assert Session(engine, system=None).messages("hi") == [{"role": "user", "content": "hi"}]


def test_every_exchange_joins_the_history_exactly_as_typed(engine):
    session = Session(engine, system="Be brief.", params=greedy(5))
    typed = "  two  spaces, a tab\tand\na newline  "
    first = session.send(typed)
    second = session.send("next")
    assert session.history == [
        {"role": "user", "content": typed}, {"role": "assistant", "content": first.reply},
        {"role": "user", "content": "next"}, {"role": "assistant", "content": second.reply}]
    assert second.stats.prompt_tokens == engine.count_prompt_tokens(
        [{"role": "system", "content": "Be brief."}, *session.history[:3]])


def test_an_interrupted_reply_is_kept(engine):
    # Greedy, with a reply known to run past its first text: sampled, a reply that ended within a
    # token or two (its text then arrives only at the end) made this fail now and then.
    uninterrupted = Session(engine, system="Be brief.", params=greedy(200)).send("go")
    assert uninterrupted.stats.completion_tokens > 5, uninterrupted.reply
    session = Session(engine, system="Be brief.", params=greedy(200))
    cancel = threading.Event()
    result = session.send("go", cancel=cancel, on_text=lambda piece: cancel.set())
    assert result.stats.stop == "interrupt"
    assert uninterrupted.reply.startswith(result.reply) and result.reply != uninterrupted.reply
    assert result.reply and 0 < result.stats.completion_tokens < 200
    assert session.history[-1] == {"role": "assistant", "content": result.reply}


def test_a_reply_stopped_before_any_text_leaves_no_trace(engine):
    session = Session(engine, system="Be brief.", params=greedy(50))
    cancel = threading.Event()
    cancel.set()
    result = session.send("go", cancel=cancel)
    assert (result.reply, result.stats.stop) == ("", "interrupt")
    assert session.history == []


def test_the_oldest_turns_are_dropped_when_the_context_is_full(engine):
    window = engine.context_window  # 256 for the tiny model
    session = Session(engine, system="Be brief.", params=greedy(60))
    long_message = "Please tell me a story about a small robot. " * 3
    results = [session.send(long_message) for _ in range(6)]
    dropped = [r.dropped for r in results]
    assert dropped[0] == 0 and any(dropped)
    assert all(d % 2 == 0 for d in dropped)  # whole exchanges, never half of one
    assert session.history[0]["role"] == "user"
    for r in results:  # what the engine was given always left room for the whole reply
        assert r.stats.prompt_tokens + 60 <= window
    assert session.messages()[0] == {"role": "system", "content": "Be brief."}


def test_a_message_too_long_for_the_context_window_is_refused(engine):
    session = Session(engine, system="Be brief.", params=greedy(10))
    with pytest.raises(UsageError, match="context window"):
        session.send("robot " * 400)
    assert session.history == []


def test_a_reply_is_shortened_only_when_the_message_alone_leaves_too_little_room(engine):
    session = Session(engine, system="Be brief.", params=GenerationParams(max_new_tokens=10_000))
    result = session.send("hi")
    assert result.stats.prompt_tokens + result.stats.completion_tokens <= engine.context_window
    assert session.params.max_new_tokens == 10_000  # the setting itself is unchanged


def test_settings_are_checked_like_command_line_options(engine):
    session = Session(engine)
    assert session.set("temperature", "0.3") == 0.3 and session.params.temperature == 0.3
    assert session.set("max_new_tokens", "64") == 64
    for name, value in (("top_p", "1.5"), ("temperature", "-1"), ("max_new_tokens", "x"),
                        ("colour", "red")):
        with pytest.raises(UsageError):
            session.set(name, value)


def test_save_and_load_round_trip(engine, tmp_path):
    session = Session(engine, system="Be brief.", params=greedy(4))
    session.send("你好 🙂")
    session.set("top_p", "0.5")
    path = session.save(tmp_path / "chat.json")
    other = Session(engine)
    other.load(path)
    assert (other.system, other.history) == (session.system, session.history)
    assert other.params.top_p == 0.5 and other.params.greedy
    assert "你好 🙂" in path.read_text(encoding="utf-8")  # readable, not \u-escaped


def test_a_bad_file_changes_nothing(engine, tmp_path):
    session = Session(engine, system="Be brief.", params=greedy(3))
    session.send("keep me")
    before = json.dumps(session.to_json())
    bad = tmp_path / "bad.json"
    for content in ("{not json", json.dumps({"format": "other"}),
                    json.dumps({"format": "internlm-kit-chat", "messages": [{"role": "tool"}]})):
        bad.write_text(content)
        with pytest.raises(UsageError):
            session.load(bad)
        assert json.dumps(session.to_json()) == before
    with pytest.raises(UsageError):
        session.save(tmp_path / "no" / "such" / "folder.json")


def test_saving_over_a_file_replaces_it_whole(engine, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text("old content")
    Session(engine).save(path)
    assert json.loads(path.read_text())["format"] == "internlm-kit-chat"
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left


def test_the_json_line_of_a_turn_has_exactly_the_documented_fields(engine):
    result = Session(engine, system="Be brief.", params=greedy(3)).send("hi")
    line = result.to_json()
    assert list(line) == ["user", "reply", "prompt_tokens", "completion_tokens", "seconds",
                          "first_token_seconds", "stop"]
    assert line["user"] == "hi" and line["stop"] in ("eos", "length", "interrupt")
    assert line["completion_tokens"] <= 3 and line["seconds"] >= line["first_token_seconds"] > 0


def test_the_user_is_told_when_old_turns_are_dropped(engine):
    import io

    from rich.console import Console

    from setup_kit.repl import Repl, Terminal

    out, err = io.StringIO(), io.StringIO()
    session = Session(engine, system="Be brief.", params=greedy(60))
    repl = Repl(session, Terminal(out, Console(file=err, width=200)))
    results = [repl.turn("Please tell me a story about a small robot. " * 3) for _ in range(4)]
    dropped = next(r.dropped for r in results if r.dropped)
    assert f"dropped the {dropped} oldest messages" in err.getvalue()
    assert f"{engine.context_window}-token context window" in err.getvalue()
    assert out.getvalue() == "".join(r.reply + "\n" for r in results)  # replies only on stdout
