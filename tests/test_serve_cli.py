"""`internlm-kit serve` as a user runs it: a real process on 127.0.0.1, and its refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fixtures.servers import free_port, stop_process, wait_for_http

KIT = str(Path(sys.executable).with_name("internlm-kit"))


def test_serve_command_starts_the_api_and_the_page(tiny_internlm2_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state")}
    with open(log, "w") as out:
        process = subprocess.Popen([KIT, "serve", "--model", str(tiny_internlm2_dir), "--port", str(port),
                                    "--device", "cpu", "--dtype", "fp32", "--threads", "1"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [tiny_internlm2_dir.name]
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "internlm-kit chat" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/static/app.js").status_code == 200
        process.send_signal(signal.SIGINT)  # Ctrl-C: a clean shutdown
        assert process.wait(timeout=30) == 0
    finally:
        stop_process(process)
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/" in text and "Traceback" not in text


def run_kit(*args):
    return subprocess.run([KIT, *args], capture_output=True, text=True, timeout=60)


def test_remote_code_engine_is_refused_with_what_to_do(tiny_internlm2_dir):
    done = run_kit("serve", "--model", str(tiny_internlm2_dir), "--engine", "remote-code")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "native engine" in done.stderr and "fix:" in done.stderr


def test_unknown_backend_and_missing_model_are_one_paragraph_errors(tmp_path):
    done = run_kit("serve", "--model", str(tmp_path), "--backend", "tgi")
    assert done.returncode == 2 and "Unknown backend 'tgi'" in done.stderr
    done = run_kit("serve", "--model", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and "There is no model folder" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_python_without_the_serve_extra_is_told_what_to_install(kit_core_venv, tiny_internlm2_dir):
    # The kit installed without its `serve` extra: no fastapi/uvicorn.
    done = subprocess.run([str(kit_core_venv), "-m", "setup_kit", "serve", "--model",
                           str(tiny_internlm2_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "fastapi" in done.stderr and "uvicorn" in done.stderr
    assert f"{kit_core_venv} -m pip install" in done.stderr
    # The same venv still refuses the remote-code engine for what it is, not for the missing packages.
    done = subprocess.run([str(kit_core_venv), "-m", "setup_kit", "serve", "--model",
                           str(tiny_internlm2_dir), "--engine", "remote-code"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "native engine" in done.stderr and "Traceback" not in done.stderr


def test_a_port_in_use_is_refused_before_the_model_loads(tiny_internlm2_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_kit("serve", "--model", str(tiny_internlm2_dir), "--port", str(port), "--device", "cpu")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"Port {port} on 127.0.0.1 is already in use" in done.stderr and "--port" in done.stderr
    assert "loading" not in done.stderr  # refused before the model loads
    done = run_kit("serve", "--model", str(tiny_internlm2_dir), "--host", "192.0.2.1", "--device", "cpu",
                   "--api-key", "k")  # TEST-NET-1: not an address of this machine
    assert done.returncode == 1 and "Cannot listen on 192.0.2.1" in done.stderr and "Traceback" not in done.stderr


def test_listening_on_all_addresses_shows_a_url_a_browser_can_open(tiny_internlm2_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state")}
    with open(log, "w") as out:
        process = subprocess.Popen([KIT, "serve", "--model", str(tiny_internlm2_dir), "--host", "0.0.0.0",
                                    "--port", str(port), "--api-key", "k", "--device", "cpu", "--threads", "1"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log)
    finally:
        stop_process(process)
    text = log.read_text()
    assert f"chat page:  http://127.0.0.1:{port}/" in text and f"OpenAI API: http://127.0.0.1:{port}/v1" in text


def start_serve(model: Path, tmp_path: Path, *args: str, env: dict | None = None):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state"), **(env or {})}
    with open(log, "w") as out:
        process = subprocess.Popen([KIT, "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
                                    "--dtype", "fp32", "--threads", "1", "--skip-checks", *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log)
    return process, port, log


def readme_openai_snippet() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = readme.split("```python\n")[1:]
    [snippet] = [b.split("```")[0] for b in blocks if "OpenAI(base_url=" in b and "stream=True" in b]
    return snippet


def test_the_readme_snippet_works_against_a_downloaded_folder_served_by_its_folder_name(
        tiny_internlm2_dir, tmp_path):
    import json
    import shutil

    # A folder as `internlm-kit download` leaves it: named by the user, with the kit's download record.
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_internlm2_dir, folder)
    (folder / ".cache" / "internlm-kit").mkdir(parents=True, exist_ok=True)
    (folder / ".cache" / "internlm-kit" / "manifest.json").write_text(
        json.dumps({"repo": "internlm/internlm2-chat-1_8b", "files": {}}), encoding="utf-8")
    process, port, log = start_serve(folder, tmp_path)
    try:
        snippet = readme_openai_snippet().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        base = f"http://127.0.0.1:{port}/v1"
        assert [m["id"] for m in httpx.get(f"{base}/models").json()["data"]] == ["my-model"]
        for name in ("my-model", "internlm/internlm2-chat-1_8b"):  # both names reach the model
            assert httpx.get(f"{base}/models/{name}").status_code == 200
        assert httpx.post(f"{base}/chat/completions", json={"model": "someone/else", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 404
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        stop_process(process)
    shown = log.read_text()
    # The start-up snippet names the exact model served, and runs as printed.
    assert 'model="my-model"' in shown and f'base_url="http://127.0.0.1:{port}/v1"' in shown


def test_serve_flags_reach_the_running_server(tiny_internlm2_dir, tmp_path):
    process, port, log = start_serve(
        tiny_internlm2_dir, tmp_path, "--max-batch", "2", "--max-queue", "3", "--model-name", "house-model",
        "--system", "Answer in French.", "--default-max-tokens", "3", "--max-body-mb", "0.01",
        env={"INTERNLM_KIT_API_KEY": "s3cret"})
    try:
        base = f"http://127.0.0.1:{port}/v1"
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/models").status_code == 401  # the key from the environment is required
        assert httpx.get(f"{base}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert [m["id"] for m in httpx.get(f"{base}/models", headers=key).json()["data"]] == ["house-model"]
        assert httpx.get(f"{base}/models/{tiny_internlm2_dir.name}", headers=key).status_code == 404
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["max_batch"] == 2 and health["max_queue"] == 3

        def prompt_tokens(messages):
            reply = httpx.post(f"{base}/chat/completions", headers=key, timeout=60, json={
                "model": "house-model", "messages": messages, "max_tokens": 1})
            assert reply.status_code == 200, reply.text
            return reply.json()["usage"]["prompt_tokens"]

        ask = {"role": "user", "content": "hi"}
        # --system is the prompt a conversation without one gets: the same tokens as sending it.
        assert prompt_tokens([ask]) == prompt_tokens([{"role": "system", "content": "Answer in French."}, ask])
        assert prompt_tokens([ask]) != prompt_tokens([{"role": "system", "content": "x"}, ask])
        # --default-max-tokens: a request without max_tokens gets 3 tokens at most
        unbounded = httpx.post(f"{base}/chat/completions", headers=key, timeout=60, json={
            "model": "house-model", "messages": [ask], "temperature": 0}).json()
        assert unbounded["usage"]["completion_tokens"] <= 3
        # --max-body-mb 0.01: a 20 kB body is refused before it is read
        big = httpx.post(f"{base}/chat/completions", headers=key, timeout=60, json={
            "model": "house-model", "messages": [{"role": "user", "content": "x" * 20_000}]})
        assert big.status_code == 413 and "0.01 MB" in big.json()["error"]["message"]
    finally:
        stop_process(process)
    shown = log.read_text()
    assert 'model="house-model"' in shown and "INTERNLM_KIT_API_KEY" in shown and "s3cret" not in shown


def test_a_hub_model_not_on_disk_is_fetched_by_make_serve_not_make_chat(tmp_path):
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path), "INTERNLM_KIT_MODELS": str(tmp_path / "models"),
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([KIT, "serve", "--model", "internlm/internlm2-chat-7b"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "make serve MODEL=internlm/internlm2-chat-7b" in done.stderr and "make chat" not in done.stderr
