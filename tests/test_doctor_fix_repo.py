"""Item 4 of issue 9: a model-folder fix names a real repo, never an OWNER/NAME placeholder."""

from __future__ import annotations

import json

import pytest

from setup_kit.modelfolder import inspect_model_folder
from fixtures.model_folders import make_model_folder, truncate


def truncated_folder(path, chat_template=True, **config):
    """A tiny folder whose config.json claims a real model's shape, with one shard cut short."""
    path = make_model_folder(path)
    data = json.loads((path / "config.json").read_text())
    data.update(config)
    (path / "config.json").write_text(json.dumps(data))
    if chat_template:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    truncate(path / "model-00001-of-00002.safetensors")
    return path


@pytest.mark.parametrize("hidden, layers, repo", [
    (2048, 24, "internlm/internlm2-chat-1_8b"),
    (4096, 32, "internlm/internlm2-chat-7b"),
    (6144, 48, "internlm/internlm2-chat-20b"),
])
def test_the_repo_is_inferred_from_the_config_shape_and_chat_template_and_said_to_be(tmp_path, hidden, layers,
                                                                                      repo):
    path = truncated_folder(tmp_path / "weights", hidden_size=hidden, num_hidden_layers=layers)
    fix = inspect_model_folder(path).problem("shard-truncated").fix
    assert f"internlm-kit download {repo} --local-dir {path}" in fix
    assert "inferred from config.json's shape" in fix and "chat template" in fix


def test_without_a_chat_template_the_shape_names_the_base_model(tmp_path):
    path = truncated_folder(tmp_path / "weights", chat_template=False, hidden_size=2048, num_hidden_layers=24)
    fix = inspect_model_folder(path).problem("shard-truncated").fix
    assert f"internlm-kit download internlm/internlm2-1_8b --local-dir {path}" in fix


def test_the_download_record_beats_the_name_in_config_which_beats_the_shape(tmp_path):
    path = truncated_folder(tmp_path / "weights", hidden_size=2048, num_hidden_layers=24,
                            _name_or_path="acme/tuned-chat")
    fix = inspect_model_folder(path).problem("shard-truncated").fix
    assert "internlm-kit download acme/tuned-chat" in fix and "_name_or_path" in fix


def test_no_fix_in_the_kit_carries_a_placeholder():
    from pathlib import Path

    import setup_kit

    root = Path(setup_kit.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "OWNER/NAME" in p.read_text(encoding="utf-8") and "download" not in p.parts
                 and p.name != "download.py"]
    assert offenders == []


def test_a_rules_plain_pip_fix_joins_the_resolution_and_one_with_options_stays_a_step_by_hand():
    from setup_kit.fix import pip_requirements

    assert pip_requirements('/env/bin/python -m pip install "transformers==4.38.2" "accelerate<0.25"') == {
        "requirements": ["transformers==4.38.2", "accelerate<0.25"]}
    assert pip_requirements('/env/bin/python -m pip install "torch==2.13.0" --force-reinstall '
                            '--index-url https://download.pytorch.org/whl/cu128') == {}
    assert pip_requirements("Set HF_HUB_OFFLINE=0 in your shell") == {}
