"""SIGTERM under load: a real `python -m setup_kit serve` process ends every open stream properly.

It used to take 5-7 s, cut streams without a final chunk or [DONE], and log tracebacks. Now every
open stream gets its last words (an error event saying the server is shutting down, or its final
chunk if it was finishing anyway) and [DONE], and the process exits 0 within 2 s, quietly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fixtures.models import build_tiny_internlm2
from fixtures.servers import free_port, stop_process, wait_for_http

STREAMS = 3


@pytest.fixture(scope="module")
def slower_model_dir(tmp_path_factory):
    """Wider and deeper than the tiny model, with room for long replies: streams still run when
    the signal comes, on any machine speed (each asks for thousands of tokens)."""
    return build_tiny_internlm2(tmp_path_factory.mktemp("models") / "slower-internlm2", hidden_size=256,
                                num_hidden_layers=4, intermediate_size=512, max_position_embeddings=8192)


def read_stream(url: str, started: threading.Event, lines: list[str]) -> None:
    body = {"messages": [{"role": "user", "content": "tell me everything"}], "stream": True,
            "temperature": 0, "max_tokens": 6000}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
                if '"content":"' in line and '"content":""' not in line:
                    started.set()


def _waited_for_a_cpu(pid: int) -> float | None:
    """Seconds the process's main thread has spent runnable but waiting for a CPU (schedstat's second
    field): on a loaded machine that is the machine's delay, not the server's."""
    try:
        return int(open(f"/proc/{pid}/task/{pid}/schedstat").read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def wait_and_time_exit(process: subprocess.Popen, sent: float, timeout: float = 10) -> tuple[int, float, float]:
    """(exit code, wall seconds since `sent`, seconds of those the main thread waited for a CPU)."""
    first = last = _waited_for_a_cpu(process.pid)
    deadline = sent + timeout
    while process.poll() is None and time.monotonic() < deadline:
        last = _waited_for_a_cpu(process.pid) or last
        time.sleep(0.005)
    code = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    exited = time.monotonic() - sent
    return code, exited, (last - first) if first is not None and last is not None else 0.0


def test_sigterm_ends_every_open_stream_with_done_and_exits_within_2s(slower_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state")}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "setup_kit", "serve", "--model", str(slower_model_dir), "--port", str(port),
             "--device", "cpu", "--dtype", "fp32", "--skip-checks", "--threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        started = [threading.Event() for _ in range(STREAMS)]
        lines: list[list[str]] = [[] for _ in range(STREAMS)]
        readers = [threading.Thread(target=read_stream, args=(url, started[i], lines[i])) for i in range(STREAMS)]
        for reader in readers:
            reader.start()
        assert all(event.wait(60) for event in started), "the streams never started"
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code, exited, starved = wait_and_time_exit(process, sent)
        for reader in readers:
            reader.join(timeout=10)
        # Within 2 s of the server's own time: what a loaded machine kept it waiting for a CPU does not
        # count (it took 5-7 s when it waited on uvicorn's graceful timeout, which is sleeping, not this).
        assert code == 0 and exited - starved < 2.0, (code, exited, starved, log.read_text())
        for stream in lines:
            assert stream[-1] == "data: [DONE]", stream[-3:]
            last = json.loads(stream[-2][6:])
            ended = ("error" in last and "shutting down" in last["error"]["message"]) or (
                last.get("choices") and last["choices"][0]["finish_reason"])
            assert ended, stream[-2]
        assert any("error" in json.loads(s[-2][6:]) for s in lines), "no stream was cut by the shutdown"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        stop_process(process)
