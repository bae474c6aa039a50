"""`internlm-kit chat` without a terminal: pipes, `--prompt`, `--json`, a wrong `--model`, the
remote-code engine where it cannot run, and the openai engine against real servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("internlm-kit"))
JSON_FIELDS = ["user", "reply", "prompt_tokens", "completion_tokens", "seconds",
               "first_token_seconds", "stop"]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def chat(*args: str, stdin: str = "", state: Path, log: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state), "NO_COLOR": "1"}
    if log is not None:
        env["INTERNLM_KIT_CHAT_LOG"] = str(log)
    return subprocess.run([EXE, "chat", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_one_paragraph_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "internlm-kit: error:" in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_piped_lines_are_turns_and_stdout_holds_only_the_replies(tiny_internlm2_dir, state_dir,
                                                                 tmp_path):
    log = tmp_path / "requests.jsonl"
    result = chat("--model", str(tiny_internlm2_dir), "--system", "Be brief.", "--greedy",
                  "--max-new-tokens", "6", stdin="first  line\n\nsecond line\n", state=state_dir,
                  log=log)
    assert result.returncode == 0, result.stderr
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r[-1]["content"] for r in requests] == ["first  line", "second line"]
    replies = [r[2]["content"] for r in requests[1:]]  # the first reply, as remembered
    assert result.stdout.startswith(replies[0] + "\n")
    assert result.stdout.count("\n") >= 2
    assert "native engine" in result.stderr and "native engine" not in result.stdout


def test_json_prints_one_object_per_turn(tiny_internlm2_dir, state_dir):
    result = chat("--model", str(tiny_internlm2_dir), "--system", "Be brief.", "--greedy",
                  "--max-new-tokens", "5", "--json", stdin="你好\nhello  again\n", state=state_dir)
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["user"] for t in turns] == ["你好", "hello  again"]
    for turn in turns:
        assert list(turn) == JSON_FIELDS
        assert turn["stop"] in ("eos", "length") and turn["completion_tokens"] <= 5
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]  # the first turn is remembered


def test_prompt_answers_once_and_exits(tiny_internlm2_dir, state_dir):
    result = chat("--model", str(tiny_internlm2_dir), "--system", "Be brief.", "--greedy",
                  "--max-new-tokens", "4", "--prompt", "hi", "--json", stdin="ignored\n",
                  state=state_dir)
    assert result.returncode == 0, result.stderr
    (turn,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert turn["user"] == "hi"


def test_a_model_that_is_not_there(state_dir, tmp_path):
    missing = chat("--model", str(tmp_path / "nowhere"), "--prompt", "hi", state=state_dir)
    assert_one_paragraph_error(missing, "no model folder", "internlm-kit doctor --model")
    hub = chat("--model", "internlm/internlm2-chat-7b", "--prompt", "hi", state=state_dir,
               stdin="")
    assert_one_paragraph_error(hub, "internlm-kit download internlm/internlm2-chat-7b")


@pytest.fixture
def broken_models(tiny_internlm2_dir, tmp_path) -> dict[str, Path]:
    models = {}
    for name in ("truncated", "no-tokenizer", "not-chat"):
        models[name] = Path(shutil.copytree(tiny_internlm2_dir, tmp_path / name))
    shard = sorted(models["truncated"].glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (models["no-tokenizer"] / "tokenizer.model").unlink()
    config = models["not-chat"] / "tokenizer_config.json"
    data = json.loads(config.read_text())
    del data["chat_template"]
    config.write_text(json.dumps(data))
    return models


def test_a_broken_model_folder_stops_at_the_preflight_with_the_doctor_command(broken_models,
                                                                              state_dir):
    for name in ("truncated", "no-tokenizer"):
        path = broken_models[name]
        result = chat("--model", str(path), "--prompt", "hi", state=state_dir)
        assert result.returncode == 1, (name, result.stderr)
        assert_one_paragraph_error(result, "pre-flight", f"internlm-kit doctor --model {path}")
        assert result.stdout == ""
    # with the checks skipped the engine itself refuses, in one paragraph
    truncated = chat("--model", str(broken_models["truncated"]), "--prompt", "hi",
                     "--skip-checks", state=state_dir)
    assert_one_paragraph_error(truncated, "internlm-kit doctor --model")


def test_a_model_without_a_chat_template_is_not_a_chat_model(broken_models, state_dir):
    result = chat("--model", str(broken_models["not-chat"]), "--prompt", "hi", state=state_dir)
    assert_one_paragraph_error(result, "not a chat model", "internlm-kit doctor --model")


def test_remote_code_engine_is_refused_where_its_code_cannot_import(tiny_internlm2_dir,
                                                                    state_dir):
    # The fixture's remote code imports what the hub's does, which transformers 5.x removed.
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.49"):
        pytest.skip("this transformers can still import the remote code")
    checked = chat("--engine", "remote-code", "--model", str(tiny_internlm2_dir), "--prompt",
                   "hi", state=state_dir)
    assert_one_paragraph_error(checked, "pre-flight")
    assert "--engine native" in checked.stderr
    skipped = chat("--engine", "remote-code", "--model", str(tiny_internlm2_dir), "--prompt",
                   "hi", "--skip-checks", state=state_dir)
    assert_one_paragraph_error(skipped, "remote code cannot run", "--engine native")


def test_bad_options_are_usage_errors(tiny_internlm2_dir, state_dir):
    result = chat("--model", str(tiny_internlm2_dir), "--engine", "magic", "--prompt", "hi",
                  state=state_dir)
    assert result.returncode == 2
    assert_one_paragraph_error(result, "Unknown engine")


# -- the openai engine through the CLI -------------------------------------------------------

def test_endpoint_chat_streams_from_the_server(scripted_openai_server, state_dir):
    result = chat("--endpoint", scripted_openai_server.url, stdin="one\ntwo  words\n",
                  state=state_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: one\necho: two  words\n"
    assert "openai engine" in result.stderr
    assert [m["role"] for m in scripted_openai_server.requests[-1]["messages"]] == [
        "system", "user", "assistant", "user"]


def test_endpoint_server_going_away_mid_reply(scripted_openai_server, state_dir):
    scripted_openai_server.behaviour.die_after = 2
    result = chat("--endpoint", scripted_openai_server.url, "--prompt", "a long question",
                  state=state_dir)
    assert result.returncode == 1
    assert result.stdout.startswith("echo: ")  # what arrived was shown
    assert "went away in the middle of the reply" in result.stderr
    assert "Traceback" not in result.stderr


def test_endpoint_nobody_listening(state_dir):
    from fixtures.servers import free_port

    result = chat("--endpoint", f"http://127.0.0.1:{free_port()}", "--prompt", "hi",
                  state=state_dir)
    assert_one_paragraph_error(result, "Could not reach", "serve")


def test_chat_against_transformers_serve_and_the_server_going_away(no_byte_llama_dir, state_dir,
                                                                   tmp_path):
    """transformers' own OpenAI-compatible server, as a real process: a two-turn chat, then the
    process is killed while it streams a reply; the partial reply is kept and shown."""
    import time

    from fixtures.servers import start_transformers_serve, stop_process

    server = start_transformers_serve(no_byte_llama_dir, tmp_path / "serve.log")
    try:
        result = chat("--endpoint", server.url, "--model", server.model, "--greedy",
                      "--max-new-tokens", "8", "--json", stdin="hello there\nand again\n",
                      state=state_dir, timeout=180)
        assert result.returncode == 0, result.stderr
        turns = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(turns) == 2
        for turn in turns:
            assert turn["reply"] and turn["stop"] in ("eos", "length")
            assert 0 < turn["completion_tokens"] <= 8
            assert 0 < turn["first_token_seconds"] <= turn["seconds"]

        env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state_dir), "NO_COLOR": "1"}
        client = subprocess.Popen(
            [EXE, "chat", "--endpoint", server.url, "--model", server.model, "--greedy",
             "--max-new-tokens", "100000", "--prompt", "hi"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        first = client.stdout.read(1)  # the reply has started
        assert first, client.stderr.read()
        time.sleep(0.2)
        server.process.kill()
        rest, err = client.communicate(timeout=60)
    finally:
        stop_process(server.process)
    assert client.returncode == 1, err
    assert (first + rest).strip()
    assert "went away in the middle of the reply" in err and "Traceback" not in err


def test_a_shared_copy_on_this_machine_is_used_in_place_when_nothing_is_downloaded(
        tiny_internlm2_dir, state_dir, tmp_path, monkeypatch):
    # InternStudio keeps the model under /root/share/new_models/<ModelScope owner>/<name>.
    share = tmp_path / "share"
    folder = share / "new_models" / "Shanghai_AI_Laboratory" / "internlm2-chat-1_8b"
    shutil.copytree(tiny_internlm2_dir, folder)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    monkeypatch.setenv("INTERNLM_KIT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("INTERNLM_KIT_SHARE_ROOTS", str(share))
    result = chat("--greedy", "--max-new-tokens", "4", "--prompt", "hi", state=state_dir)
    assert result.returncode == 0, result.stderr
    assert "internlm2-chat-1_8b" in result.stderr and result.stdout.strip()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before, "nothing written there"
    assert not (tmp_path / "models").exists()
    # With no shared copy either, the message says how to fetch it.
    monkeypatch.setenv("INTERNLM_KIT_SHARE_ROOTS", "")
    missing = chat("--prompt", "hi", state=state_dir)
    assert_one_paragraph_error(missing, "internlm-kit download internlm/internlm2-chat-1_8b")


def test_dtype_spellings_the_doctor_uses_work_and_threads_is_accepted(tiny_internlm2_dir, state_dir):
    # The doctor's fixes say float16 / bfloat16; chat's own names are fp16 / bf16: both must work.
    done = chat("--model", str(tiny_internlm2_dir), "--device", "cpu", "--dtype", "float32", "--threads", "1",
                "--greedy", "--max-new-tokens", "4", "--prompt", "hi", "--json", state=state_dir)
    assert done.returncode == 0, done.stderr
    assert "fp32" in done.stderr
    # float16 on the CPU reaches the engine's own fp16 refusal, not "unknown dtype".
    refused = chat("--model", str(tiny_internlm2_dir), "--device", "cpu", "--dtype", "float16", "--prompt", "hi",
                   state=state_dir)
    assert_one_paragraph_error(refused, "--dtype fp32")
    assert "Unknown dtype" not in refused.stderr


@pytest.mark.parametrize("endpoint", ["http://localhost:abc/v1", "http://[::1/v1"])
def test_an_endpoint_that_is_not_a_url_is_a_clear_error(state_dir, endpoint):
    result = chat("--endpoint", endpoint, "--prompt", "hi", state=state_dir)
    assert result.returncode == 2, result.stderr
    assert_one_paragraph_error(result, "is not a valid URL", "--endpoint http://127.0.0.1:8000/v1")


def test_what_slips_through_every_clear_error_is_reported_as_a_bug_with_its_traceback_in_a_log(tmp_path):
    # A verb that fails in a way no error path foresaw, run through the kit's real main().
    script = ("import sys\nfrom setup_kit import cli\n"
              "@cli.app.command('explode')\ndef explode():\n    {}['missing']\n"
              "sys.argv = ['internlm-kit', 'explode']\ncli.main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path)})
    assert result.returncode == 70
    assert "Traceback" not in result.stderr and "a bug in internlm-kit" in result.stderr
    assert "KeyError: 'missing'" in result.stderr
    [log] = (tmp_path / "crashes").glob("crash-*.log")
    assert str(log) in result.stderr
    assert "Traceback" in log.read_text() and "in explode" in log.read_text()


# --- Ctrl-C without a terminal: while the model loads, and during a --prompt reply ------------

def _mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_while_the_model_loads_ends_the_kit_and_no_chat_starts(tiny_internlm2_dir, state_dir):
    """The signal lands while torch and transformers are still being imported (libtorch is mapped,
    the banner is not out yet): exit 130, nothing swallowed, no reply, no traceback."""
    import signal
    import time

    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state_dir), "NO_COLOR": "1"}
    process = subprocess.Popen([EXE, "chat", "--model", str(tiny_internlm2_dir), "--prompt", "hi"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not _mapped(process.pid, "libtorch_cpu") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _mapped(process.pid, "libtorch_cpu"), "torch was never loaded"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "native engine" not in err, "the chat started after Ctrl-C"  # the banner comes after the load
    assert out == ""
    assert "Traceback" not in err and "Exception ignored" not in err and "KeyboardInterrupt" not in err


@pytest.fixture(scope="module")
def endless_dir(tiny_internlm2_dir, tmp_path_factory) -> Path:
    from fixtures.models import build_tiny_internlm2
    from test_chat_repl import never_end_turn

    folder = build_tiny_internlm2(tmp_path_factory.mktemp("models") / "tiny-endless",
                                  max_position_embeddings=4096,
                                  tokenizer_model=tiny_internlm2_dir / "tokenizer.model")
    never_end_turn(folder)
    return folder


def test_ctrl_c_during_a_prompt_reply_keeps_what_was_said_and_exits_130(endless_dir, state_dir):
    """README: `chat --prompt` exits 130 on Ctrl-C, the reply so far on stdout."""
    import signal

    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state_dir), "NO_COLOR": "1"}
    process = subprocess.Popen([EXE, "chat", "--model", str(endless_dir), "--prompt", "hi",
                                "--max-new-tokens", "3000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = process.stdout.read(1)  # the reply has started (it never ends by itself)
    assert first, process.stderr.read()
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    # Not .strip(): the tiny model's reply may be control characters such as "\x1e", which str.strip()
    # counts as whitespace (a reply of "\x1e" failed this once); only the kit's own newline goes.
    assert (first + rest).rstrip("\n")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
