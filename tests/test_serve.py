"""`internlm-kit serve`: the OpenAI-compatible API on the tiny model, through real HTTP on 127.0.0.1.

The tiny model has random weights: replies are noise (often U+FFFD, since it emits byte tokens that
never form UTF-8), but noise the server must stream without failing, and greedy noise is repeatable,
which is what lets these tests compare batched answers with lone ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fixtures.servers import KIT_MODEL, PacedModel, start_kit_server

GREEDY = {"temperature": 0, "max_tokens": 48}
# On the tiny fixture model this prompt's greedy reply runs past 200 tokens (no early end of turn).
LONG_PROMPT = "a long answer please"


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def stream_text(server, content: str, system: str | None = None, **params) -> tuple[str, str | None]:
    """One streaming request through the official client; (text, finish_reason)."""
    text, finish = [], None
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}]
    stream = client(server).chat.completions.create(model=KIT_MODEL, messages=messages, stream=True, **params)
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_models_lists_the_served_model(kit_server):
    models = client(kit_server).models.list()
    assert [m.id for m in models.data] == [KIT_MODEL]
    health = httpx.get(kit_server.base + "/health").json()
    assert health["status"] == "ok" and health["model"] == KIT_MODEL


def test_openai_client_non_streaming(kit_server):
    reply = client(kit_server).chat.completions.create(
        model=KIT_MODEL, messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello there"}], **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == KIT_MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # Random weights rarely hit end-of-turn in 48 tokens; either way usage counts what was made.
    assert reply.usage.completion_tokens <= 48
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streaming_matches_non_streaming_and_reports_usage(kit_server):
    lone = client(kit_server).chat.completions.create(
        model=KIT_MODEL, messages=[{"role": "user", "content": "Count to three"}], **GREEDY)
    chunks = list(client(kit_server).chat.completions.create(
        model=KIT_MODEL, messages=[{"role": "user", "content": "Count to three"}], stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == lone.choices[0].message.content
    assert finishes == [lone.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == lone.usage.completion_tokens


def test_raw_stream_is_server_sent_events_ending_in_done(kit_server):
    body = {"model": KIT_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 5, "temperature": 0}
    with httpx.stream("POST", kit_server.url + "/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "length"


def test_max_tokens_ends_with_length_and_stop_string_ends_with_stop(kit_server):
    text, finish = stream_text(kit_server, "Tell me a story", temperature=0, max_tokens=12)
    assert finish == "length"
    # A stop string taken from the greedy reply itself: the reply must end just before it.
    long_text, _ = stream_text(kit_server, "Tell me a story", temperature=0, max_tokens=40)
    stop = long_text[8:10]
    assert stop and stop in long_text
    cut, finish = stream_text(kit_server, "Tell me a story", temperature=0, max_tokens=40, stop=[stop])
    assert finish == "stop"
    assert cut == long_text[:long_text.index(stop)]


def test_seed_makes_sampling_repeatable(kit_server):
    params = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 24}
    first = stream_text(kit_server, "Pick a word", seed=1234, **params)
    second = stream_text(kit_server, "Pick a word", seed=1234, **params)
    other = stream_text(kit_server, "Pick a word", seed=99, **params)
    assert first == second
    assert other != first


def test_eight_concurrent_greedy_streams_each_equal_the_lone_answer(kit_server):
    """Batching must not change a greedy answer. Tolerance: none; texts (and the token counts
    behind them) are compared exactly, and the scheduler test compares token ids."""
    prompts = [f"Question {i}: " + "why " * (i + 1) for i in range(8)]
    # A short system prompt of their own: InternLM's default would not leave the tiny model room.
    lone = [stream_text(kit_server, p, system="Be brief.", temperature=0, max_tokens=64) for p in prompts]
    barrier = threading.Barrier(8)

    def together(p):
        barrier.wait()
        return stream_text(kit_server, p, system="Be brief.", temperature=0, max_tokens=64)

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(together, prompts))
    assert batched == lone


def test_disconnect_mid_stream_frees_the_slot_and_next_request_is_prompt(paced_kit_server):
    """The paced server makes the 200-token reply take about 6 s: its slot must be free within 2."""
    kit_server = paced_kit_server
    body = {"model": KIT_MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}],
            "stream": True, "temperature": 0, "max_tokens": 200}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", kit_server.url + "/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    seen += 1
                if seen >= 3:
                    break
        # leaving the block closes the connection with most of the 200 tokens still to come
    deadline = time.monotonic() + 2
    while kit_server.served.scheduler.load["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kit_server.served.scheduler.load["active"] == 0, "the abandoned generation kept running"
    started = time.monotonic()
    reply = client(kit_server).chat.completions.create(
        model=KIT_MODEL, messages=[{"role": "user", "content": "short"}], temperature=0, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - started < 5


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


def still_answers(server, key: str = "unused") -> None:
    reply = client(server, key).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "still there?"}], temperature=0, max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_malformed_json_is_400_and_server_still_answers(kit_server):
    r = httpx.post(kit_server.url + "/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.post(kit_server.url + "/chat/completions", json={"model": KIT_MODEL, "messages": []})
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(kit_server.url + "/chat/completions",
                   json={"messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in error_of(r)["message"]
    still_answers(kit_server)


def test_unknown_model_is_404(kit_server):
    with pytest.raises(openai.NotFoundError) as caught:
        client(kit_server).chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    still_answers(kit_server)


def test_prompt_past_the_context_window_is_400(kit_server):
    window = kit_server.served.context_window
    r = httpx.post(kit_server.url + "/chat/completions", json={
        "model": KIT_MODEL, "messages": [{"role": "user", "content": "word " * (window * 2)}]})
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "context_length_exceeded" and str(window) in err["message"]
    still_answers(kit_server)


def test_api_key_required_when_set(tiny_model_and_tokenizer):
    server = start_kit_server(tiny_model_and_tokenizer, api_key="s3cret-key", max_batch=2)
    try:
        r = httpx.get(server.url + "/models")
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong-key").chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert httpx.get(server.base + "/health").status_code == 200  # health needs no key
        still_answers(server, "s3cret-key")
    finally:
        server.stop()


def test_full_queue_is_503_with_retry_after(tiny_model_and_tokenizer):
    model, tokenizer, info = tiny_model_and_tokenizer
    server = start_kit_server((PacedModel(model, 0.03), tokenizer, info), max_batch=1, max_queue=0)
    body = {"model": server.model, "messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True,
            "temperature": 0, "max_tokens": 200}
    try:
        with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/chat/completions",
                                                           json=body) as busy:
            lines = busy.iter_lines()  # kept referenced: a collected iterator closes the stream
            next(line for line in lines if '"content":"' in line and '""' not in line)
            assert server.served.scheduler.load["active"] == 1  # the one slot is generating
            r = httpx.post(server.url + "/chat/completions", json={**body, "stream": False})
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
            assert error_of(r)["code"] == "queue_full"
        deadline = time.monotonic() + 5
        while server.served.scheduler.load["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        still_answers(server)
    finally:
        server.stop()


def test_chat_endpoint_talks_to_the_kit_server(kit_server, tmp_path):
    exe = Path(sys.executable).with_name("internlm-kit")
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [str(exe), "chat", "--endpoint", kit_server.url, "--prompt", "Hello", "--greedy",
         "--max-new-tokens", "16"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr


def test_a_request_without_a_system_message_gets_internlms_default_one(kit_server):
    """As `internlm-kit chat` and LMDeploy's api_server do; a system message of the request's own replaces it."""
    from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT

    def prompt_tokens(messages):
        reply = client(kit_server).chat.completions.create(model=KIT_MODEL, messages=messages, max_tokens=1,
                                                            temperature=0)
        return reply.usage.prompt_tokens

    user = {"role": "user", "content": "hi"}
    default = prompt_tokens([user])
    assert default == prompt_tokens([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, user])
    assert prompt_tokens([{"role": "system", "content": "Be brief."}, user]) < default


def test_serve_system_sets_or_turns_off_the_prompt_put_before_a_conversation_without_one():
    from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT
    from setup_kit.serve.app import with_default_system

    user = [{"role": "user", "content": "hi"}]
    assert with_default_system(user)[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert with_default_system(user, "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert with_default_system(user, "") == user  # serve --system "": nothing added
    own = [{"role": "system", "content": "Mine."}, *user]
    assert with_default_system(own, "Be brief.") == own
