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
from fixtures.venvs import STACKS, stack_venv


@pytest.fixture(scope="session")
def long_context_dir(tmp_path_factory) -> Path:
    """The tiny model with the real config's 32768-token context and dynamic RoPE scaling."""
    return build_tiny_internlm2(tmp_path_factory.mktemp("models") / "tiny-32k", max_position_embeddings=32768,
                                rope_scaling={"type": "dynamic", "factor": 2.0})


def chat(python: Path, model: Path, state: Path) -> tuple[dict, int]:
    """(the --json reply, the peak resident memory in KiB of the chat process)."""
    code = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
            "print(r.stdout, r.stderr, file=sys.stderr); print(json.dumps([r.returncode, r.stdout,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    run = subprocess.run([sys.executable, "-c", code, str(python), "-m", "setup_kit", "chat", "--model", str(model),
                          "--greedy", "--max-new-tokens", "16", "--prompt", "Hello, 你好", "--json"],
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
