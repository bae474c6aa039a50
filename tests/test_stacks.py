"""chat on every stack the kit supports, beside the developers' 5.x: the same greedy reply, and no
max_position_embeddings² mask (a 32768-token config costs what a short one does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.models import build_tiny_internlm2
from fixtures.servers import start_kit_serve, stop_process
from fixtures.venvs import STACKS, stack_venv


@pytest.fixture(scope="session")
def long_context_dir(tmp_path_factory) -> Path:
    """The tiny model with the real config's 32768-token context and dynamic RoPE scaling."""
    return build_tiny_internlm2(tmp_path_factory.mktemp("models") / "tiny-32k", max_position_embeddings=32768,
                                rope_scaling={"type": "dynamic", "factor": 2.0})


def chat(python: Path, model: Path, state: Path, prompt: str = "Hello, 你好", *extra: str) -> tuple[dict, int]:
    """(the --json reply, the peak resident memory in KiB of the chat process); the CPU default
    format (int4) unless `extra` names another."""
    code = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
            "print(r.stdout, r.stderr, file=sys.stderr); print(json.dumps([r.returncode, r.stdout,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    run = subprocess.run([sys.executable, "-c", code, str(python), "-m", "setup_kit", "chat", "--model", str(model),
                          "--greedy", "--max-new-tokens", "16", "--prompt", prompt, "--json", *extra],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "INTERNLM_KIT_STATE_DIR": str(state)})
    rc, out, peak = json.loads(run.stdout.strip().splitlines()[-1])
    assert rc == 0, run.stderr
    return json.loads(out.strip().splitlines()[-1]), peak


@pytest.mark.slow
@pytest.mark.parametrize("release", list(STACKS))
def test_chat_on_each_stack_matches_the_developers_stack(release, long_context_dir, tmp_path):
    state = tmp_path / "state"
    dev, dev_peak = chat(Path(sys.executable), long_context_dir, state)
    other, other_peak = chat(stack_venv(release), long_context_dir, state)
    assert other["reply"] == dev["reply"] and other["completion_tokens"] == 16
    assert other["prompt_tokens"] == dev["prompt_tokens"]
    assert other_peak < 1.2 * dev_peak, (other_peak, dev_peak)  # 4.38's full mask alone was 1 GiB+


@pytest.mark.slow
@pytest.mark.parametrize("release", list(STACKS))
def test_a_long_prompt_on_each_stack_gets_the_developers_reply(release, long_context_dir, tmp_path):
    """Past 512 tokens 4.38 prefills in chunks (its attention is quadratic in one forward's length):
    the chunked prompt must give the reply the whole one does."""
    prompt = " ".join(f"step {n}: paint the {'red' if n % 3 else 'blue'} house" for n in range(150))
    state = tmp_path / "state"
    # fp32: the reply must be the same token for token, which bf16's rounding (int4's compute) does
    # not promise between a chunked and a whole prefill; the default format runs in the test above.
    dev, _ = chat(Path(sys.executable), long_context_dir, state, prompt, "--dtype", "fp32")
    other, _ = chat(stack_venv(release), long_context_dir, state, prompt, "--dtype", "fp32")
    assert dev["prompt_tokens"] > 1024, dev  # three chunks and more
    assert other["prompt_tokens"] == dev["prompt_tokens"]
    assert other["reply"] == dev["reply"] and other["completion_tokens"] == 16


def serve_replies(python: Path, model: Path, tmp_path: Path) -> tuple[str, str]:
    """A real `internlm-kit serve` in that interpreter: (the non-streaming reply, the streamed reply).
    Every completion must succeed: on 4.x the scheduler once failed each one with a 500 while /health said ok."""
    import httpx

    server = start_kit_serve(python, model, tmp_path)
    try:
        body = {"model": server.model, "messages": [{"role": "user", "content": "Hello, 你好"}],
                "max_tokens": 12, "temperature": 0}
        answer = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, (answer.text, server.log.read_text())
        assert answer.json()["usage"]["completion_tokens"] == 12
        streamed, events = "", []
        with httpx.stream("POST", f"{server.url}/chat/completions", json={**body, "stream": True},
                          timeout=120) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]", events
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "error" not in chunk, (chunk, server.log.read_text())
            streamed += chunk["choices"][0]["delta"].get("content") or ""
        replies = answer.json()["choices"][0]["message"]["content"], streamed
    finally:
        stop_process(server.process)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("release", list(STACKS))
def test_serve_on_each_stack_answers_as_on_the_developers_stack(release, tiny_internlm2_dir, tmp_path):
    dev = serve_replies(Path(sys.executable), tiny_internlm2_dir, tmp_path / "dev")
    other = serve_replies(stack_venv(release), tiny_internlm2_dir, tmp_path / release)
    assert other == dev and other[0] == other[1]


def batched_and_lone(python: Path, model: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    """A real `internlm-kit serve` in that interpreter: (three greedy replies asked at once, the same
    three asked one at a time). At once they are batched: left-padded prompts, a padding mask, and a
    batch that shrinks as replies end, all through the compatibility layer."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["Hi", "Tell me about the river and the red house, please.", "你好, how are you today?"]
    server = start_kit_serve(python, model, tmp_path, "--system", "")
    try:
        def ask(index: int) -> str:
            body = {"model": server.model, "messages": [{"role": "user", "content": prompts[index]}],
                    "max_tokens": 8 + 6 * index, "temperature": 0}
            answer = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120)
            assert answer.status_code == 200, (answer.text, server.log.read_text())
            return answer.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, range(len(prompts))))
        alone = [ask(i) for i in range(len(prompts))]
    finally:
        stop_process(server.process)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()
    return together, alone


@pytest.mark.slow
@pytest.mark.parametrize("release", list(STACKS))
def test_serve_batches_on_each_stack_as_it_answers_alone(release, tiny_internlm2_dir, tmp_path):
    together, alone = batched_and_lone(stack_venv(release), tiny_internlm2_dir, tmp_path)
    assert together == alone


LOAD_CONVERTED = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("<|im_start|>user\\nHello, 你好<|im_end|>", return_tensors="pt").input_ids
with torch.no_grad():
    print(type(model).__name__, model(ids).logits[0, -1].argmax().item())
"""


@pytest.mark.slow
@pytest.mark.parametrize("release", list(STACKS))
def test_convert_on_each_stack_writes_a_folder_that_stack_loads(release, tiny_internlm2_dir, tmp_path):
    python = stack_venv(release)
    done = subprocess.run([str(python), "-m", "setup_kit", "convert", str(tiny_internlm2_dir), str(tmp_path / "llama")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    on_stack = subprocess.run([str(python), "-c", LOAD_CONVERTED, str(tmp_path / "llama")],
                              capture_output=True, text=True, timeout=300)
    assert on_stack.returncode == 0, on_stack.stderr
    on_dev = subprocess.run([sys.executable, "-c", LOAD_CONVERTED, str(tmp_path / "llama")],
                            capture_output=True, text=True, timeout=300)
    assert on_dev.returncode == 0, on_dev.stderr
    assert on_stack.stdout.split()[0] == "LlamaForCausalLM"
    assert on_stack.stdout.split()[-1] == on_dev.stdout.split()[-1]  # the same next token on both stacks
