"""The doctor's rehearsal, one behaviour at a time (issue 9): the engine it assumes and says why, the native
rehearsal running no remote code, a producer thread that raises inside stream_chat (the tutorial's loop
hangs; the rehearsal names the cause), and a tokenizer that gives the chat tokens new ids past the
vocabulary (what every transformers 5.x does with the hub's own tokenizer code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.rehearsal_table import run_oracle

KIT = Path(sys.executable).with_name("internlm-kit")


def doctor(*args: str, timeout: float = 300) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([str(KIT), "doctor", "--json", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout), proc


def check(report: dict, check_id: str) -> dict:
    return next(c for c in report["checks"] if c["id"] == check_id)


def test_where_the_kit_runs_the_native_engine_is_assumed_and_rehearsed_without_remote_code(tiny_internlm2_dir):
    report, proc = doctor("--model", str(tiny_internlm2_dir))
    assert report["target"]["engine"] == "native"
    assert "internlm-kit runs in this interpreter" in report["target"]["engine_reason"]
    native = check(report, "model.rehearsal.native")
    assert native["status"] == "ok", native
    assert any("ran no remote code" in d for d in native["details"])
    assert check(report, "model.rehearsal.remote-code")["status"] == "skip"


def test_a_vocabulary_too_small_for_the_chat_tokens_fails_the_native_rehearsal(tiny_internlm2_dir, tmp_path):
    import shutil

    folder = tmp_path / "short-vocab"
    shutil.copytree(tiny_internlm2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] -= 6  # the embedding table ends before the six chat tokens
    (folder / "config.json").write_text(json.dumps(config))
    report, proc = doctor("--model", str(folder), "--only", "model.rehearsal.native")
    native = check(report, "model.rehearsal.native")
    assert proc.returncode == 1 and native["status"] == "fail", native
    assert "native load fails: ModelFolderError" in native["summary"]  # the engine's own refusal, as chat says it
    assert f"has {config['vocab_size'] + 6} tokens but" in native["summary"] and str(folder) in native["summary"]
    assert "internlm-kit-rehearsal-" not in native["summary"]  # the user's folder, not the twin


@pytest.mark.slow  # a venv of transformers 4.36 (cached)
def test_in_a_python_without_the_kit_the_remote_code_engine_is_assumed(revision_folders):
    from fixtures.rehearsal_matrix import matrix_venv

    python = matrix_venv("4.36")
    report, proc = doctor("--python", str(python), "--model", str(revision_folders["early-2024"]))
    assert report["target"]["engine"] == "remote-code"
    assert "not installed in this interpreter" in report["target"]["engine_reason"]
    rehearsed = check(report, "model.rehearsal.remote-code")
    assert rehearsed["status"] == "ok" and "transformers 4.36.2" in rehearsed["summary"]
    assert any("ran the folder's own remote code" in d for d in rehearsed["details"])


@pytest.fixture(scope="session")
def raising_streamer_folder(revision_folders, tmp_path_factory) -> Path:
    """early-2024 code whose streamer raises on its first token, in generate's producer thread. Its tokenizer is
    the slow class alone, which 5.x still maps (with the fast one named, 5.x builds its own tokenizer and the model
    dies at chat, before stream_chat: that failure has tests of its own)."""
    import shutil

    folder = tmp_path_factory.mktemp("streamer") / "internlm2-chat-raising-streamer"
    shutil.copytree(revision_folders["early-2024"], folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"]["AutoTokenizer"] = ["tokenization_internlm2.InternLM2Tokenizer", None]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    path = folder / "modeling_internlm2.py"
    code = path.read_text()
    marker = "                self.cache.extend(value.tolist())\n"
    assert marker in code
    path.write_text(code.replace(marker, '                raise RuntimeError("the streamer broke")\n' + marker))
    return folder


def test_a_producer_thread_that_raises_is_a_failure_with_its_cause_not_a_hang(raising_streamer_folder):
    hung, exception, _ = run_oracle(Path(sys.executable), raising_streamer_folder, timeout=30)
    assert not hung and exception.startswith("hang")  # the tutorial's loop waits forever

    started = time.perf_counter()
    report, proc = doctor("--model", str(raising_streamer_folder), "--engine", "remote-code",
                          "--only", "model.rehearsal.remote-code")
    rehearsed = check(report, "model.rehearsal.remote-code")
    assert proc.returncode == 1 and rehearsed["status"] == "fail"
    assert "stream_chat fails: RuntimeError: the streamer broke" in rehearsed["summary"]
    assert any("a hang" in d for d in rehearsed["details"])
    assert time.perf_counter() - started < 120  # it does not wait forever itself


@pytest.fixture(scope="session")
def new_chat_ids_folder(revision_folders, tmp_path_factory) -> Path:
    """The tokenizer loads with the six chat tokens as NEW tokens after the vocabulary (ids vocab..vocab+5), as
    transformers 5.x does with the hub's own tokenizer code: here because tokenizer_config.json no longer maps
    them onto the renamed pieces, so the tokenizer adds them through add_special_tokens."""
    import shutil

    folder = tmp_path_factory.mktemp("chat-ids") / "internlm2-chat-new-chat-ids"
    shutil.copytree(revision_folders["early-2024"], folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 3}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder


def test_chat_tokens_past_the_vocabulary_are_named_and_explained_on_5x(new_chat_ids_folder):
    passed, exception, step = run_oracle(Path(sys.executable), new_chat_ids_folder)
    assert not passed and exception.startswith("IndexError: index out of range"), exception  # the real symptom

    report, proc = doctor("--model", str(new_chat_ids_folder), "--engine", "remote-code")
    rehearsed = check(report, "model.rehearsal.remote-code")
    assert proc.returncode == 1 and rehearsed["status"] == "fail"
    text = rehearsed["summary"] + "\n".join(rehearsed["details"])
    assert "past the model's vocabulary" in text and "<|im_start|>=" in text
    assert "[remote-tokenizer-new-chat-token-ids]" in text
    assert 'pip install "transformers==4.46.3"' in rehearsed["fix"]
