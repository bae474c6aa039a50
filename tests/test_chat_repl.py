"""`internlm-kit chat` in a terminal: a real subprocess on a pseudo-terminal, driven like a user.

The engine's view of the conversation is read from `INTERNLM_KIT_CHAT_LOG` (the session appends
every message list it sends to the engine), and `/stats` shows the prompt the engine tokenized.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest

PROMPT = ">>> "
SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def long_context_model(tiny_internlm2_dir, tmp_path_factory) -> Path:
    """The tiny model with room for long replies (4096 positions), for Ctrl-C mid-reply."""
    from fixtures.models import build_tiny_internlm2

    folder = build_tiny_internlm2(tmp_path_factory.mktemp("models") / "tiny-long",
                                  max_position_embeddings=4096,
                                  tokenizer_model=tiny_internlm2_dir / "tokenizer.model")
    never_end_turn(folder)
    return folder


def never_end_turn(folder: Path) -> None:
    """Make the end-of-turn tokens unreachable, so a reply runs until it is stopped.

    Residual dimension 0 is held at a large constant (every embedding has it, no layer writes to it),
    so after the final norm it is large and positive; the output rows of the eos tokens read only
    that dimension, negatively: their logits are hugely negative whatever the context.
    """
    import json

    from safetensors.torch import load_file, save_file

    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            if name == "model.tok_embeddings.weight":
                tensor[:, 0] = 10.0
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                tensor[0, :] = 0.0
            elif name == "output.weight":
                tensor[eos, :] = 0.0
                tensor[eos, 0] = -100.0
        save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")  # shared: the converted tokenizer is cached once


class Chat:
    def __init__(self, model: Path, state: Path, log: Path, *args: str):
        exe = Path(sys.executable).with_name("internlm-kit")
        env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state), "INTERNLM_KIT_CHAT_LOG": str(log),
               "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
        self.log = log
        self.child = pexpect.spawn(str(exe), ["chat", "--model", str(model), "--system", SYSTEM,
                                              "--skip-checks", *args],
                                   env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))

    def prompt(self) -> str:
        """Wait for the next prompt; return what the terminal showed since the last one."""
        self.child.expect_exact(PROMPT)
        return self.child.before.replace("\r\n", "\n")

    def say(self, line: str) -> str:
        self.child.sendline(line)
        return self.prompt()

    def requests(self) -> list[list[dict]]:
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def stats(self) -> dict:
        shown = self.say("/stats")
        found = re.search(r"prompt (\d+) tokens, reply (\d+) tokens.*stop: (\w+)", shown)
        assert found, shown
        return {"prompt": int(found[1]), "reply": int(found[2]), "stop": found[3]}

    def close(self) -> int:
        self.child.expect(pexpect.EOF, timeout=30)
        self.child.close()
        return self.child.exitstatus


def test_replies_stream_keep_typed_spaces_and_remember_the_conversation(
        tiny_internlm2_dir, state_dir, tmp_path):
    chat = Chat(tiny_internlm2_dir, state_dir, tmp_path / "requests.jsonl", "--greedy",
                "--max-new-tokens", "12")
    banner = chat.prompt()
    assert "native engine" in banner and "/help" in banner

    first = chat.say("hello   there,  friend ")
    first_stats = chat.stats()
    chat.say("and  now?")
    second_stats = chat.stats()

    requests = chat.requests()
    assert requests[0] == [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "hello   there,  friend "}]
    # the second prompt holds the first exchange, the reply exactly as it was shown
    _system, user1, assistant1, user2 = requests[1]
    assert (user1["content"], user2["content"]) == ("hello   there,  friend ", "and  now?")
    assert assistant1["role"] == "assistant" and assistant1["content"]
    assert assistant1["content"].replace("\r", "") in first.replace("\r", "")
    assert second_stats["prompt"] > first_stats["prompt"] + first_stats["reply"]

    chat.child.sendline('"""')
    chat.child.sendline("line one")
    chat.child.sendline("  line two")
    chat.child.sendline('"""')
    chat.prompt()
    assert requests[0][0] == chat.requests()[2][0]
    assert chat.requests()[2][-1] == {"role": "user", "content": "line one\n  line two"}

    chat.child.sendline("/exit")
    assert chat.close() == 0


def test_ctrl_c_stops_the_reply_keeps_it_and_returns_to_the_prompt(
        long_context_model, state_dir, tmp_path):
    chat = Chat(long_context_model, state_dir, tmp_path / "requests.jsonl", "--max-new-tokens",
                "3000", "--seed", "1")
    chat.prompt()
    chat.child.sendline("tell me a very long story")
    chat.child.expect_exact("tell me a very long story\r\n")  # the terminal's echo
    chat.child.expect(r"\S[\s\S]{20}")  # the reply is streaming: some text is on screen, no clock involved
    streamed = chat.child.after
    chat.child.sendintr()
    chat.child.expect_exact("reply stopped", timeout=60)
    screen = streamed + chat.child.before
    # The terminal echoes ^C where the signal landed; not one more token of the reply comes after it.
    assert "^C" in screen and screen.split("^C", 1)[1].replace("\x1b[2m", "").strip(" \r\n(") == "", screen
    shown = screen.split("^C", 1)[0]
    chat.prompt()
    stats = chat.stats()
    assert stats["stop"] == "interrupt" and 0 < stats["reply"] < 3000

    chat.say("/set max_new_tokens 3")
    chat.say("go on")
    kept = chat.requests()[-1][-2]
    assert kept["role"] == "assistant" and kept["content"]  # the partial reply is in the history
    assert shown.replace("\r\n", "\n").endswith(kept["content"])  # exactly what was on screen, no more

    chat.child.sendintr()  # Ctrl-C at an empty prompt ends the session cleanly
    assert chat.close() == 0


def test_reset_save_and_load_round_trip(tiny_internlm2_dir, state_dir, tmp_path):
    saved = tmp_path / "conversation.json"
    chat = Chat(tiny_internlm2_dir, state_dir, tmp_path / "requests.jsonl", "--greedy",
                "--max-new-tokens", "8")
    chat.prompt()
    chat.say("first question")
    chat.say("/set temperature 0.5")
    assert "saved 2 messages" in chat.say(f"/save {saved}")
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["system"] == SYSTEM and data["params"]["temperature"] == 0.5
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]

    assert "conversation cleared" in chat.say("/reset")
    chat.say("fresh start")
    assert [m["role"] for m in chat.requests()[-1]] == ["system", "user"]  # nothing remembered

    assert "loaded 2 messages" in chat.say(f"/load {saved}")
    chat.say("and then?")
    assert chat.requests()[-1] == [{"role": "system", "content": SYSTEM}, *data["messages"],
                                   {"role": "user", "content": "and then?"}]

    assert "There is no file" in chat.say(f"/load {tmp_path / 'missing.json'}")
    assert "Unknown command" in chat.say("/nonsense")
    chat.child.sendeof()  # Ctrl-D
    assert chat.close() == 0


def test_text_appears_as_it_arrives_and_ctrl_c_works_against_a_server(
        scripted_openai_server, state_dir, tmp_path):
    scripted_openai_server.behaviour.delay = 0.25  # per 3-character chunk
    exe = Path(sys.executable).with_name("internlm-kit")
    child = pexpect.spawn(str(exe), ["chat", "--endpoint", scripted_openai_server.url],
                          env={**os.environ, "INTERNLM_KIT_STATE_DIR": str(state_dir),
                               "NO_COLOR": "1", "TERM": "dumb"},
                          encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    child.sendline("abcdefghijklmnopqr")  # the reply is 8 chunks, about 2 s
    child.expect_exact("abcdefghijklmnopqr\r\n")
    child.expect_exact("echo:")
    first_text = time.monotonic()
    child.expect_exact(" abcdefghijklmnopqr")
    assert time.monotonic() - first_text > 1.0  # streamed piece by piece, not printed at the end
    child.expect_exact(PROMPT)

    child.sendline("x" * 60)  # 22 chunks, over 5 s
    child.expect_exact("echo: x")
    started = time.monotonic()
    child.sendintr()
    child.expect_exact("reply stopped")
    child.expect_exact(PROMPT)
    assert time.monotonic() - started < 2.0

    child.send("half typed")  # Ctrl-C on a half-typed line throws the line away, nothing more
    child.expect_exact("half typed")  # the terminal's echo: the line editor has it
    child.sendintr()
    child.expect_exact(PROMPT)
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_set_system_and_double_slash_do_what_help_says(tiny_internlm2_dir, state_dir, tmp_path):
    chat = Chat(tiny_internlm2_dir, state_dir, tmp_path / "requests.jsonl", "--max-new-tokens", "4")
    chat.prompt()
    assert "greedy = True" in chat.say("/set greedy true")  # listed by /set, so settable
    assert "greedy True" in chat.say("/set")
    assert "takes true or false" in chat.say("/set greedy maybe")
    assert "greedy = False" in chat.say("/set greedy off")
    assert "Be terse." not in chat.say("/system")
    assert "system prompt set" in chat.say("/system Be terse.")
    assert "system prompt: Be terse." in chat.say("/system")
    chat.say("//etc/hosts is a file")  # a message that starts with / is typed with //
    assert chat.requests()[-1] == [{"role": "system", "content": "Be terse."},
                                   {"role": "user", "content": "/etc/hosts is a file"}]
    chat.child.sendeof()
    assert chat.close() == 0


@pytest.mark.parametrize("params, said", [({"temperature": "hot"}, 'temperature is "hot"'),
                                          ([1], "'params' is not an object")])
def test_loading_a_hand_edited_file_with_bad_settings_is_a_clear_message_and_the_chat_goes_on(
        tiny_internlm2_dir, state_dir, tmp_path, params, said):
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({"format": "internlm-kit-chat", "version": 1, "system": "x",
                                  "messages": [], "params": params}), encoding="utf-8")
    chat = Chat(tiny_internlm2_dir, state_dir, tmp_path / "requests.jsonl", "--greedy", "--max-new-tokens", "3")
    chat.prompt()
    chat.say("remember me")
    shown = chat.say(f"/load {edited}")
    assert said in shown and "Traceback" not in shown, shown
    chat.say("still there?")  # the session survived with its conversation
    assert [m["content"] for m in chat.requests()[-1] if m["role"] == "user"] == ["remember me", "still there?"]
    chat.child.sendeof()
    assert chat.close() == 0


def test_a_reply_streams_with_noflsh_and_the_terminal_is_given_back_as_it_was(monkeypatch):
    # Ctrl-C must not make the terminal driver throw away output in transit (the last piece of a kept
    # reply would never reach the screen); the terminal's own settings come back after the reply.
    import pty
    import termios
    import threading

    from setup_kit.repl import _sigint_sets

    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "r") as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            before = termios.tcgetattr(slave)
            assert not before[3] & termios.NOFLSH
            with _sigint_sets(threading.Event()):
                assert termios.tcgetattr(slave)[3] & termios.NOFLSH
            assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
