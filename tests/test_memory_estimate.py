"""The doctor's memory estimate for the native engine against the peak a real `chat --prompt`
reaches, on the developers' stack and on the profiles' transformers 4.38.2 and 4.46.3: a 32768-token
config (what made 4.38 build a 32768² mask) and a prompt that fills the 4096-token context the
estimate is made for."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fixtures.models import build_bench_internlm2
from fixtures.venvs import stack_venv

NEW_TOKENS = 8
GIB = 2**30


@pytest.fixture(scope="module")
def bench_32k_dir(tmp_path_factory) -> Path:
    """The benchmark shape (about 26M parameters, fp32: weights and activations are not lost in the
    runtime's own memory) with the real config's context and dynamic RoPE."""
    return build_bench_internlm2(tmp_path_factory.mktemp("models") / "bench-32k", max_position_embeddings=32768,
                                 rope_scaling={"type": "dynamic", "factor": 2.0})


def long_prompt() -> str:
    """About 3,950 tokens with the fixture tokenizer: with the template and the reply, just under 4096."""
    words = "the robot paints a small red house near the river and learns about colour light and shade".split()
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(1160))


def chat_peak(python: Path, model: Path, state: Path) -> tuple[dict, int]:
    """(the --json reply, the chat process's own peak resident bytes, from wait4's rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([str(python), "-m", "setup_kit", "chat", "--model", str(model), "--device", "cpu",
                                    "--dtype", "fp32", "--greedy", "--max-new-tokens", str(NEW_TOKENS), "--prompt",
                                    long_prompt(), "--json", "--skip-checks"], stdout=out, stderr=err,
                                   env={**os.environ, "INTERNLM_KIT_STATE_DIR": str(state)})
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        assert os.waitstatus_to_exitcode(status) == 0, err.read().decode()[-3000:]
        return json.loads(out.read().decode().strip().splitlines()[-1]), usage.ru_maxrss * 1024


def doctor_estimate(python: Path, model: Path) -> tuple[float, str]:
    """(system.ram's "~N GiB needed" in GiB, its explanation) from the doctor in that interpreter."""
    done = subprocess.run([str(python), "-m", "setup_kit", "doctor", "--model", str(model), "--only", "system.ram",
                           "--json"], capture_output=True, text=True, timeout=300)
    check = next(c for c in json.loads(done.stdout)["checks"] if c["id"] == "system.ram")
    return float(re.search(r"~([\d.]+) GiB needed to run on the CPU", check["summary"]).group(1)), check["details"][0]


def assert_estimate_holds(python: Path, model: Path, tmp_path: Path) -> None:
    from setup_kit.checks.gpu import memory_estimate
    from setup_kit.modelfolder import inspect_model_folder

    reply, peak = chat_peak(python, model, tmp_path / "state")
    tokens = reply["prompt_tokens"] + reply["completion_tokens"]
    assert 3800 <= tokens <= 4096, tokens  # the context the doctor's estimate is made for
    folder = inspect_model_folder(model)
    parts = memory_estimate(folder.config, folder.parameters, 4, tokens, on_cpu=True,
                            largest_shard=max(w.size for w in folder.weight_files))
    estimate = sum(parts.values())
    assert peak <= estimate <= 1.5 * peak, (peak / GIB, estimate / GIB, parts)
    said, how = doctor_estimate(python, model)
    assert abs(said - estimate / GIB) <= 0.1, (said, estimate / GIB, how)  # the doctor says this estimate
    assert "KV cache for 4096 tokens" in how and "float32" in how


def test_the_doctors_estimate_holds_for_a_real_chat_on_the_developers_stack(bench_32k_dir, tmp_path):
    assert_estimate_holds(Path(sys.executable), bench_32k_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("release", ["4.38.2", "4.46.3"])
def test_the_doctors_estimate_holds_for_a_real_chat_on_the_profiles_stacks(release, bench_32k_dir, tmp_path):
    assert_estimate_holds(stack_venv(release), bench_32k_dir, tmp_path)
