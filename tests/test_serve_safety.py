"""`internlm-kit serve` under hostile and careless clients: one request can never harm another.

Each test reproduces a defect found by trying the server as such clients would (issue 10) and shows
it gone, through real HTTP on 127.0.0.1 against the tiny model. "Batch-mates never notice" is checked
exactly: their greedy token streams equal the ones they get alone.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fixtures.servers import KIT_MODEL, ModelWrapper, PacedModel, start_kit_server

LONG_PROMPT = "a long answer please"  # the tiny model's greedy reply to it runs past 200 tokens


def chat(server, content="hi", **params) -> httpx.Response:
    body = {"model": server.model, "messages": [{"role": "user", "content": content}], **params}
    return httpx.post(server.url + "/chat/completions", json=body, timeout=120)


def stream(server, content="hi", **params) -> tuple[str, str | None, dict | None]:
    """(text, finish_reason, error) of one streamed reply, read to [DONE]."""
    body = {"model": server.model, "messages": [{"role": "user", "content": content}], "stream": True, **params}
    text, finish, error = [], None, None
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        data = json.loads(line[6:])
        if "error" in data:
            error = data["error"]
            continue
        for choice in data["choices"]:
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish, error


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class PoisonModel(ModelWrapper):
    """The tiny model, but any batch row whose input holds `poison` gets NaN scores: a stand-in
    for a step that overflows for one request only."""

    def __init__(self, model, poison: int, pause: float = 0.0):
        self._model, self._poison, self._pause = model, poison, pause

    def __call__(self, *args, **kwargs):
        time.sleep(self._pause)
        out = self._model(*args, **kwargs)
        rows = (kwargs["input_ids"] == self._poison).any(dim=-1)
        out.logits[rows] = float("nan")
        return out


@pytest.fixture(scope="module")
def poison_server(tiny_model_and_tokenizer):
    model, tokenizer, info = tiny_model_and_tokenizer
    poison = tokenizer.convert_tokens_to_ids("好")  # in no prompt below, nor in the default system prompt
    server = start_kit_server((PoisonModel(model, poison, 0.01), tokenizer, info), max_batch=8)
    server.poison = poison
    yield server
    server.stop()


MATES = [f"Question {i}: " + "why " * (i + 1) for i in range(4)]


def test_extreme_sampling_values_and_a_nan_step_fail_only_their_own_request(poison_server):
    """temperature 9e-39, top_p 1e-45 and seed >= 2**64 once made every batch-mate fail with
    'probability tensor contains either inf, nan' / 'Overflow when unpacking long long'."""
    server = poison_server
    greedy = {"temperature": 0, "max_tokens": 24}
    alone = [stream(server, m, **greedy) for m in MATES]
    assert all(error is None for _, _, error in alone)
    never = {"logit_bias": {str(server.poison): -100}}  # sampling must not stumble on the poison
    hostile = [
        {"temperature": 9e-39, "max_tokens": 24, **never},
        {"temperature": 1.0, "top_p": 1e-45, "max_tokens": 24, **never},
        {"temperature": 1.0, "seed": 2**64 + 7, "max_tokens": 24, **never},
        {"temperature": 1.5, "seed": -(2**70), "max_tokens": 24, **never},
        # its first token is the poisoned one, so its next step's scores are NaN
        {"temperature": 0, "max_tokens": 24, "logit_bias": {str(server.poison): 100}},
    ]
    jobs = [(m, greedy) for m in MATES] + [("Pick a word", h) for h in hostile]
    barrier = threading.Barrier(len(jobs))

    def together(job):
        barrier.wait()
        return stream(server, job[0], **job[1])

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(together, jobs))
    assert results[:len(MATES)] == alone, "a batch-mate noticed"
    for result in results[len(MATES):-1]:  # normalised at the edge: they simply work
        assert result[2] is None and result[1] in ("stop", "length"), result
    text, finish, error = results[-1]
    assert error is not None and "non-finite" in error["message"] and finish is None
    # the 9e-39 request is greedy in all but name: the same as temperature 0
    assert results[len(MATES)][0] == stream(server, "Pick a word", **greedy, **never)[0]


def test_a_nan_step_in_a_non_streaming_request_is_its_own_error_and_the_server_goes_on(poison_server):
    r = chat(poison_server, "Pick a word", temperature=0, max_tokens=8,
             logit_bias={str(poison_server.poison): 100})
    assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
    assert chat(poison_server, "still there?", temperature=0, max_tokens=3).status_code == 200


@pytest.fixture(scope="module")
def paced_one_slot(tiny_model_and_tokenizer):
    """One slot, ~30 tokens a second: a 200-token reply takes ~6 s; a second request queues."""
    model, tokenizer, info = tiny_model_and_tokenizer
    server = start_kit_server((PacedModel(model, 0.03), tokenizer, info), max_batch=1, max_queue=4)
    yield server
    server.stop()


def raw_post(server, body: dict) -> socket.socket:
    """A request sent on a bare socket, so the test can hang up at the moment it chooses."""
    data = json.dumps(body).encode()
    host, port = server.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_an_abandoned_non_streaming_request_stops_generating(paced_one_slot):
    """It used to run on for its whole budget (one ran ~140 s, ~32k tokens) while tokens flowed."""
    server = paced_one_slot
    sched = server.served.scheduler
    sock = raw_post(server, {"model": KIT_MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}],
                             "temperature": 0, "max_tokens": 200})
    assert wait_until(lambda: sched.load["active"] == 1)
    sock.close()
    left = time.monotonic()
    assert wait_until(lambda: sched.load["active"] == 0, 2.0), "the abandoned request kept its slot"
    assert time.monotonic() - left < 2.0  # the whole reply would take ~6 s


def test_a_streaming_client_that_leaves_while_queued_gives_up_its_place(paced_one_slot):
    server = paced_one_slot
    sched = server.served.scheduler
    body = {"model": KIT_MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True,
            "temperature": 0, "max_tokens": 200}
    running = raw_post(server, body)
    assert wait_until(lambda: sched.load["active"] == 1)
    queued = raw_post(server, body)
    assert wait_until(lambda: sched.load["waiting"] == 1)
    queued.close()
    assert wait_until(lambda: sched.load["waiting"] == 0, 2.0), "the queued client kept its place"
    assert sched.load["active"] == 1  # the running one is untouched
    running.close()
    assert wait_until(lambda: sched.load["active"] == 0, 2.0)


def test_without_max_tokens_a_reply_gets_the_servers_default_budget_not_the_whole_context(
        tiny_model_and_tokenizer):
    server = start_kit_server(tiny_model_and_tokenizer, default_max_tokens=5)
    try:
        r = chat(server, LONG_PROMPT, temperature=0)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"
        r = chat(server, LONG_PROMPT, temperature=0, max_tokens=9)  # a request's own value still wins
        assert r.json()["usage"]["completion_tokens"] == 9
    finally:
        server.stop()


@pytest.fixture(scope="module")
def small_body_server(tiny_model_and_tokenizer):
    server = start_kit_server(tiny_model_and_tokenizer, max_body_bytes=64 * 1024)
    yield server
    server.stop()


def test_a_body_over_the_limit_is_413_before_it_is_read(small_body_server):
    server = small_body_server
    r = chat(server, "x" * 100_000)
    assert r.status_code == 413 and "65,536 bytes" in r.json()["error"]["message"]
    # without a Content-Length (chunked), counted while it arrives
    body = json.dumps({"messages": [{"role": "user", "content": "y" * 100_000}]}).encode()
    r = httpx.post(server.url + "/chat/completions", content=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    # a 50 MB body announced: refused at once, nothing buffered
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    assert chat(server, "still there?", temperature=0, max_tokens=3).status_code == 200


def test_a_message_that_cannot_fit_is_refused_without_tokenizing_it_and_health_stays_quick(kit_server):
    """A 5 MB message took 32 s of CPU before its 400 and slowed /health meanwhile (bodies over
    4 MB are 413 now; this one is 3 MB)."""
    started = time.monotonic()
    r = chat(kit_server, "word " * 600_000)  # 3 MB: under the body limit
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 5
    assert httpx.get(kit_server.base + "/health", timeout=5).status_code == 200


def test_without_an_api_key_only_this_machines_host_names_are_served(kit_server):
    """DNS rebinding: a web page at evil.example pointed at 127.0.0.1 sends Host: evil.example."""
    url = kit_server.url + "/models"
    port = kit_server.base.rsplit(":", 1)[1]
    r = httpx.get(url, headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "app.localhost"):
        assert httpx.get(url, headers={"Host": host}).status_code == 200, host


def test_with_an_api_key_other_host_names_are_served(tiny_model_and_tokenizer):
    server = start_kit_server(tiny_model_and_tokenizer, api_key="k3y", max_batch=1)
    try:
        r = httpx.get(server.url + "/models", headers={"Host": "models.example.org",
                                                       "Authorization": "Bearer k3y"})
        assert r.status_code == 200
    finally:
        server.stop()


def test_wrong_method_is_405_with_allow(kit_server):
    r = httpx.get(kit_server.url + "/chat/completions")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = httpx.post(kit_server.url + "/models")
    assert r.status_code == 405 and r.headers["Allow"] == "GET"


@pytest.mark.parametrize("body, where", [
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": False}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}}, "logit_bias"),
])
def test_malformed_shapes_are_400_naming_the_field(kit_server, body, where):
    r = httpx.post(kit_server.url + "/chat/completions", json=body)
    assert r.status_code == 400 and where in r.json()["error"]["message"], r.text


def test_a_lone_surrogate_is_a_plain_400(kit_server):
    raw = b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}'
    r = httpx.post(kit_server.url + "/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "surrogate" in message and "\\ud800" in message
    assert "Traceback" not in message and "tokenizer" not in message.lower()
