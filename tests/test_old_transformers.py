"""The native engine on the stacks the profiles install, not only on the transformers the kit is developed on.

`make setup PROFILE=tutorial` gives transformers 4.38.2 (tokenizers 0.15, huggingface-hub 0.24); the
chat must work there exactly as on 5.x: same prompt, same greedy reply. Both environments share one
state dir, as they would on a user's machine, so the cached tokenizer must not leak between stacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `tutorial_stack_venv` (fixtures.venvs): transformers 4.38.2, CPU torch, the kit installed.


def greedy_reply(python: Path, model: Path, state: Path) -> dict:
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state)}
    run = subprocess.run([str(python), "-m", "setup_kit", "chat", "--model", str(model), "--greedy",
                          "--max-new-tokens", "16", "--prompt", "Hello, 你好", "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    # transformers 4.38 warns about its own use of `seq_len` on every chat; the kit drops that line.
    assert "deprecated" not in run.stderr, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_native_chat_on_the_tutorial_transformers_matches_current(tutorial_stack_venv, tiny_internlm2_dir,
                                                                  tmp_path):
    state = tmp_path / "state"
    current = greedy_reply(Path(sys.executable), tiny_internlm2_dir, state)
    tutorial = greedy_reply(tutorial_stack_venv, tiny_internlm2_dir, state)
    assert tutorial["prompt_tokens"] == current["prompt_tokens"]
    assert tutorial["completion_tokens"] == current["completion_tokens"] == 16
    assert tutorial["reply"] == current["reply"]


# Chat markup with English and Chinese, spaces at the start, runs of spaces, newlines and special tokens
# at the start, middle and end: where 4.38's converter used to put a dummy '▁' after each special token.
MIXED_TEXTS = [
    "<s><|im_start|>system\n你是书生·浦语 (InternLM).<|im_end|>\n<|im_start|>user\nHello, 你好<|im_end|>\n",
    "Hello, 你好",
    "  two leading spaces, then   three",
    "人工智能 正在改变<|im_end|> and after\n    indented code",
    " <s>x <|im_start|> y</s>",
]

TOKEN_IDS = """
import json, sys
from pathlib import Path
from setup_kit.tokenizer_files import load_tokenizer
tokenizer = load_tokenizer(Path(sys.argv[1]), Path(sys.argv[2]))
texts = json.loads(sys.argv[3])
ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
print(json.dumps({"ids": ids, "text": [tokenizer.decode(i) for i in ids]}))
"""


def token_ids(python: Path, folder: Path, cache: Path) -> dict:
    run = subprocess.run([str(python), "-c", TOKEN_IDS, str(folder), str(cache), json.dumps(MIXED_TEXTS)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tokenizer_gives_the_same_ids_on_the_tutorial_transformers(tutorial_stack_venv, tiny_internlm2_dir,
                                                                   tiny_llama_dir, tmp_path, tiny_sentencepiece):
    """Both the tokenizer built from tokenizer.model and the converted folder's tokenizer.json."""
    for folder in (tiny_internlm2_dir, tiny_llama_dir):
        current = token_ids(Path(sys.executable), folder, tmp_path / "cache")
        tutorial = token_ids(tutorial_stack_venv, folder, tmp_path / "cache")
        assert tutorial == current, folder
    # No '▁' after a special token, and plain text as sentencepiece encodes it.
    im_start = current["ids"][0][1]
    after = current["ids"][0][2]
    assert not tiny_sentencepiece.id_to_piece(after).startswith("\u2581")
    assert current["ids"][1] == tiny_sentencepiece.encode(MIXED_TEXTS[1])
    assert im_start == tiny_sentencepiece.get_piece_size() - 1


@pytest.mark.slow
def test_converted_folder_loads_on_the_tutorial_transformers(tutorial_stack_venv, tiny_llama_dir):
    """Without trust_remote_code, and with the dynamic RoPE scaling 4.38's LlamaConfig validates strictly."""
    script = ("import sys; from transformers import AutoModelForCausalLM as M;"
              "m = M.from_pretrained(sys.argv[1]); print(m.config.rope_scaling['type'])")
    run = subprocess.run([str(tutorial_stack_venv), "-c", script, str(tiny_llama_dir)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "dynamic"
