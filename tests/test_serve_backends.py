"""`internlm-kit serve --backend lmdeploy|vllm`: the command lines, the hand-over, the missing package.

The real servers need a GPU; here a stand-in `vllm`/`lmdeploy` (a package on PYTHONPATH and a script
on PATH that records its arguments) shows what the kit runs, that its output reaches the terminal
and that its exit code is passed on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from setup_kit.serve.backends import install_command, lmdeploy_command, vllm_command

KIT = str(Path(sys.executable).with_name("internlm-kit"))


def test_lmdeploy_command_line():
    cmd = lmdeploy_command("/venv/bin/lmdeploy", Path("/models/internlm2-chat-1_8b"), name="internlm2",
                           host="0.0.0.0", port=23333, tp=2, api_key="k1", dtype="bf16")
    assert cmd.argv == ["/venv/bin/lmdeploy", "serve", "api_server", "/models/internlm2-chat-1_8b",
                        "--server-name", "0.0.0.0", "--server-port", "23333", "--tp", "2",
                        "--model-name", "internlm2", "--dtype", "bfloat16", "--api-keys", "k1"]


def test_vllm_command_line_keeps_the_key_out_of_argv():
    cmd = vllm_command("vllm", Path("/models/m-llama"), name="internlm2", host="127.0.0.1", port=8000,
                       tp=4, api_key="secret", dtype="fp16")
    assert cmd.argv == ["vllm", "serve", "/models/m-llama", "--host", "127.0.0.1", "--port", "8000",
                        "--tensor-parallel-size", "4", "--served-model-name", "internlm2",
                        "--dtype", "float16"]
    assert "secret" not in cmd.argv and cmd.env == {"VLLM_API_KEY": "secret"}


@pytest.mark.parametrize("backend, cuda, expected", [
    ("vllm", "12.8", "vllm --extra-index-url https://download.pytorch.org/whl/cu128"),
    ("vllm", "12.4", "vllm --extra-index-url https://download.pytorch.org/whl/cu126"),
    ("vllm", "13.0", "vllm --extra-index-url https://download.pytorch.org/whl/cu130"),
    ("lmdeploy", "12.1", "lmdeploy"),
    ("lmdeploy", "11.8", "lmdeploy-0.7.1+cu118-cp310-cp310-manylinux2014_x86_64.whl "
                         "--extra-index-url https://download.pytorch.org/whl/cu118"),
])
def test_install_command_matches_the_cuda_here(backend, cuda, expected):
    command = install_command(backend, cuda, python=(3, 10))
    assert command.startswith(f"{sys.executable} -m pip install ")
    assert command.endswith(expected)


def run_kit(*args, env=None, timeout=120):
    return subprocess.run([KIT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("backend", ["vllm", "lmdeploy"])
def test_missing_backend_prints_the_install_command_and_exits_1(backend, tiny_internlm2_dir):
    if shutil.which(backend):
        pytest.skip(f"{backend} is installed here")
    done = run_kit("serve", "--model", str(tiny_internlm2_dir), "--backend", backend)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"needs the `{backend}` package" in done.stderr
    assert "-m pip install " in done.stderr and backend in done.stderr.split("pip install", 1)[1]


@pytest.fixture
def fake_backends(tmp_path):
    """Stand-in `vllm` and `lmdeploy`: importable packages plus scripts that log argv and exit 3."""
    pkgs, bin_dir = tmp_path / "pkgs", tmp_path / "bin"
    log = tmp_path / "calls.jsonl"
    for name in ("vllm", "lmdeploy"):
        (pkgs / name).mkdir(parents=True)
        (pkgs / name / "__init__.py").write_text("")
        script = bin_dir / name
        bin_dir.mkdir(exist_ok=True)
        script.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv, 'key': os.environ.get('VLLM_API_KEY')}}) + '\\n')\n"
            "print('fake server listening', flush=True)\nsys.exit(3)\n")
        script.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(pkgs)}
    return env, log


def test_vllm_backend_converts_then_runs_vllm_and_passes_its_exit_code(fake_backends, tiny_internlm2_dir,
                                                                       tmp_path):
    env, log = fake_backends
    model = tmp_path / "models" / "tiny-chat"
    shutil.copytree(tiny_internlm2_dir, model)
    done = run_kit("serve", "--model", str(model), "--backend", "vllm", "--tp", "2", "--port", "8123",
                   "--api-key", "k-123", env=env)
    assert done.returncode == 3, done.stderr
    assert "fake server listening" in done.stdout  # the child's output is the terminal's
    assert "k-123" not in done.stderr
    call = json.loads(log.read_text().splitlines()[0])
    converted = model.with_name("tiny-chat-llama")
    assert call["argv"][1:] == ["serve", str(converted), "--host", "127.0.0.1", "--port", "8123",
                                "--tensor-parallel-size", "2", "--served-model-name", "tiny-chat"]
    assert call["key"] == "k-123"
    assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"


def test_lmdeploy_backend_serves_the_internlm2_folder_as_is(fake_backends, tiny_internlm2_dir):
    env, log = fake_backends
    done = run_kit("serve", "--model", str(tiny_internlm2_dir), "--backend", "lmdeploy", "--host", "0.0.0.0",
                   env=env)
    assert done.returncode == 3
    assert "without an API key" in done.stderr  # exposed address, no key: warned
    call = json.loads(log.read_text().splitlines()[0])
    assert call["argv"][1:5] == ["serve", "api_server", str(tiny_internlm2_dir), "--server-name"]
