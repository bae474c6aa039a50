"""The doctor's memory estimate for the native engine against the peak a real `chat --prompt`
reaches, on the developers' stack and on the profiles' transformers 4.38.2 and 4.46.3: a 32768-token
config (what made 4.38 build a 32768² mask) and a prompt that fills the 4096-token context the
estimate is made for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fixtures.memory_runs import chat_peak, doctor_ram_estimate, long_prompt
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


def assert_estimate_holds(python: Path, model: Path, tmp_path: Path) -> None:
    from setup_kit.checks.gpu import memory_estimate
    from setup_kit.modelfolder import inspect_model_folder

    reply, peak = chat_peak(python, model, tmp_path / "state", long_prompt(), NEW_TOKENS)
    tokens = reply["prompt_tokens"] + reply["completion_tokens"]
    assert 3800 <= tokens <= 4096, tokens  # the context the doctor's estimate is made for
    folder = inspect_model_folder(model)
    parts = memory_estimate(folder.config, folder.parameters, 4, tokens, on_cpu=True,
                            largest_shard=max(w.size for w in folder.weight_files))
    estimate = sum(parts.values())
    assert peak <= estimate <= 1.5 * peak, (peak / GIB, estimate / GIB, parts)
    said, how = doctor_ram_estimate(python, model)
    assert abs(said - estimate / GIB) <= 0.1, (said, estimate / GIB, how)  # the doctor says this estimate
    assert "KV cache for 4096 tokens" in how and "float32" in how


def test_the_doctors_estimate_holds_for_a_real_chat_on_the_developers_stack(bench_32k_dir, tmp_path):
    assert_estimate_holds(Path(sys.executable), bench_32k_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("release", ["4.38.2", "4.46.3"])
def test_the_doctors_estimate_holds_for_a_real_chat_on_the_profiles_stacks(release, bench_32k_dir, tmp_path):
    assert_estimate_holds(stack_venv(release), bench_32k_dir, tmp_path)
