"""The remote-code engine where the model's remote code runs: transformers 4.38.2, the tutorial's stack.

The hub's modeling_internlm2.py is not available here, so the folder carries a stand-in written from
the architecture (fixtures.remote_code). Its logits are checked against the independent plain-torch
forward pass first, so the engine is driven by a model shown to be InternLM2; then the engine must
give the native engine's greedy reply, token for token, on the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_internlm2 import forward, load_internlm2, reference_logits, relative_error

# Chat markup, English and Chinese, leading spaces and runs of spaces, special tokens everywhere.
TEXTS = [
    "<s><|im_start|>system\n你是书生·浦语 (InternLM).<|im_end|>\n<|im_start|>user\nHello, 你好<|im_end|>\n",
    "Hello, 你好",
    "  two leading spaces, then   three",
    "人工智能 正在改变<|im_end|> and after\n    indented code",
]

# Run in the tutorial venv: the stand-in through `trust_remote_code`, with no cache, the legacy tuple
# cache and a DynamicCache; every position's logits are saved for the test to compare.
REMOTE_FORWARD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

folder, inputs, out = sys.argv[1:4]
inputs = json.load(open(inputs))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32)
model.eval()
ids = torch.tensor([inputs["ids"]])
half = ids.shape[1] // 2


def stepwise(cache):
    # The first half in one call, then one token per call; the cache goes back in as it came out.
    logits, kinds = [], []
    for start, end in [(0, half)] + [(i, i + 1) for i in range(half, ids.shape[1])]:
        result = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True)
        logits.append(result.logits[0])
        cache = result.past_key_values
        kinds.append(type(cache).__name__)
    return torch.cat(logits), sorted(set(kinds))


with torch.no_grad():
    saved = {"full": model(input_ids=ids).logits[0],
             "long": model(input_ids=torch.tensor([inputs["long"]])).logits[0]}
    for name, cache in [("legacy", None), ("dynamic", DynamicCache())]:
        saved[name], saved[name + "_cache"] = stepwise(cache)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
saved["tokenizer"] = type(tokenizer).__name__
saved["ids"] = [tokenizer.encode(t, add_special_tokens=False) for t in inputs["texts"]]
saved["text"] = [tokenizer.decode(i) for i in saved["ids"]]
torch.save(saved, out)
"""


@pytest.fixture(scope="module")
def remote_forward(tutorial_stack_venv, tiny_remote_code_dir, tiny_sentencepiece, tmp_path_factory):
    work = tmp_path_factory.mktemp("remote-forward")
    ids = tiny_sentencepiece.encode("Hello, 你好! The quick brown fox jumps over the lazy dog.")
    generator = torch.Generator().manual_seed(0)
    # Longer than max_position_embeddings (256): the dynamic RoPE scaling is in play.
    long = torch.randint(3, tiny_sentencepiece.get_piece_size(), (300,), generator=generator).tolist()
    (work / "inputs.json").write_text(json.dumps({"ids": ids, "long": long, "texts": TEXTS}))
    run = subprocess.run([str(tutorial_stack_venv), "-c", REMOTE_FORWARD, str(tiny_remote_code_dir),
                          str(work / "inputs.json"), str(work / "out.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return ids, long, torch.load(work / "out.pt", weights_only=False)


@pytest.mark.slow
def test_the_stand_in_remote_code_computes_internlm2(remote_forward, tiny_remote_code_dir):
    """fp32 logits within 1e-5 of the reference: at once, and step by step on either cache."""
    ids, long, saved = remote_forward
    expected = reference_logits(tiny_remote_code_dir, ids)[0]
    assert relative_error(saved["full"], expected) < 1e-5
    for name, cache in [("legacy", "tuple"), ("dynamic", "DynamicCache")]:
        assert saved[name + "_cache"] == [cache], name
        assert relative_error(saved[name], expected) < 1e-5, name

    config, tensors = load_internlm2(tiny_remote_code_dir)
    scaled = forward(config, tensors, torch.tensor([long]))[0]
    assert relative_error(saved["long"], scaled) < 1e-5
    # ... and the scaling matters at that length, so the check above covers it.
    unscaled = forward({**config, "rope_scaling": None}, tensors, torch.tensor([long]))[0]
    assert relative_error(unscaled, scaled) > 1e-3


@pytest.mark.slow
def test_the_stand_in_tokenizer_gives_the_kits_ids(remote_forward, tiny_remote_code_dir, tmp_path):
    from setup_kit.tokenizer_files import load_tokenizer

    _, _, saved = remote_forward
    assert saved["tokenizer"] == "InternLM2Tokenizer"
    kit = load_tokenizer(tiny_remote_code_dir, cache_root=tmp_path)
    assert saved["ids"] == [kit.encode(t, add_special_tokens=False) for t in TEXTS]
    # Except a text that starts with spaces: this tokenizer, like sentencepiece's decode, drops one
    # (the dummy prefix it cannot tell from a real space); the kit's keeps them.
    assert saved["text"][2] == TEXTS[2][1:]
    kept = [0, 1, 3]
    assert ([saved["text"][k] for k in kept] == [kit.decode(saved["ids"][k]) for k in kept]
            == [TEXTS[k] for k in kept])


def chat_json(python: Path, model: Path, state: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state)}
    run = subprocess.run([str(python), "-m", "setup_kit", "chat", "--model", str(model), *args, "--greedy",
                          "--max-new-tokens", "16", "--prompt", "Hello, 你好", "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


@pytest.mark.slow
def test_remote_code_chat_gives_the_native_reply_on_the_tutorial_transformers(
        tutorial_stack_venv, tiny_remote_code_dir, tmp_path):
    """The doctor's import check passes, the remote code loads, and the decode loop over its legacy
    cache and end-of-turn ids gives what the native engine gives."""
    remote, banner = chat_json(tutorial_stack_venv, tiny_remote_code_dir, tmp_path / "state",
                               "--engine", "remote-code", "--dtype", "fp32")
    assert "remote-code engine (trust_remote_code)" in banner
    native, banner = chat_json(tutorial_stack_venv, tiny_remote_code_dir, tmp_path / "state", "--dtype", "fp32")
    assert "native engine" in banner
    assert remote["prompt_tokens"] == native["prompt_tokens"] > 0
    assert remote["completion_tokens"] == native["completion_tokens"] == 16
    assert remote["reply"] == native["reply"] and remote["reply"]


def assert_one_paragraph(run: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr and "internlm-kit: error:" in run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


@pytest.mark.slow
def test_remote_code_that_fails_to_load_is_one_paragraph(tutorial_stack_venv, tiny_remote_code_dir,
                                                         tmp_path):
    """Whatever the model's own code raises (here what flash-attn raises on an older GPU)."""
    broken = shutil.copytree(tiny_remote_code_dir, tmp_path / "broken")
    modeling = broken / "modeling_internlm2.py"
    modeling.write_text(modeling.read_text() + (
        "\n\ndef _refuse(self, config):\n"
        "    raise RuntimeError('FlashAttention only supports Ampere GPUs or newer.')\n\n\n"
        "InternLM2ForCausalLM.__init__ = _refuse\n"))
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run([str(tutorial_stack_venv), "-m", "setup_kit", "chat", "--engine", "remote-code",
                          "--model", str(broken), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert_one_paragraph(run, 1, "remote code failed to load: RuntimeError: FlashAttention",
                         "--engine native")


def test_the_stand_in_is_refused_like_the_hubs_code_on_current_transformers(tiny_remote_code_dir,
                                                                            tmp_path):
    """It imports what the hub's file imports, so the doctor judges it the same."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.49"):
        pytest.skip("this transformers can still import the remote code")
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run([sys.executable, "-m", "setup_kit", "chat", "--engine", "remote-code",
                          "--model", str(tiny_remote_code_dir), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert_one_paragraph(run, 1, "pre-flight", "--engine native")


def test_remote_code_whose_own_tokenizer_misses_the_model_is_one_paragraph(revision_folders, tmp_path):
    """On 5.x the early-2024 code imports and loads, but transformers builds the tokenizer itself and gives the
    chat tokens new ids past the vocabulary: the first reply would die with an IndexError in the model, which
    the kit once reported as a bug of its own. It is said before any reply, with the fix (issue 9)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5"):
        pytest.skip("4.x maps the chat tokens onto the pieces they rename")
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run([sys.executable, "-m", "setup_kit", "chat", "--engine", "remote-code",
                          "--model", str(revision_folders["early-2024"]), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert_one_paragraph(run, 1, "does not fit the model", "<|im_start|>=", "transformers==4.46.3",
                         "--engine native")
    assert "bug in internlm-kit" not in run.stderr
