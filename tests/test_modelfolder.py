"""The model-folder reader: what it must notice without loading a single weight."""

from __future__ import annotations

import json

import pytest

from fixtures.model_folders import CONFIG, make_model_folder, truncate
from setup_kit.errors import ModelFolderError
from setup_kit.modelfolder import inspect_model_folder, open_model_folder, remote_code_modules


def codes(folder):
    return [p.code for p in folder.problems]


def test_a_complete_folder_has_no_problems_and_counts_its_parameters(tmp_path):
    path = make_model_folder(tmp_path / "internlm2-chat-1_8b")
    folder = open_model_folder(path)
    assert folder.problems == []
    assert folder.model_type == "internlm2"
    assert folder.torch_dtype == "bfloat16"
    assert [w.name for w in folder.weight_files] == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"]
    # per layer: wqkv 128x64 + w1 128x64, two layers, bf16
    assert folder.parameters == 2 * (128 * 64 + 128 * 64)
    assert folder.weight_bytes == folder.parameters * 2
    assert folder.remote_code_needed == ["configuration_internlm2.py", "modeling_internlm2.py"]
    assert "tokenizer.model" in folder.tokenizer_files


def test_a_truncated_shard_is_found_from_its_header_and_size(tmp_path):
    path = make_model_folder(tmp_path / "m")
    truncate(path / "model-00002-of-00002.safetensors", 0.7)
    folder = inspect_model_folder(path)
    assert codes(folder) == ["shard-truncated"]
    problem = folder.problems[0]
    assert "model-00002-of-00002.safetensors" in problem.message
    assert "internlm-kit download" in problem.fix
    with pytest.raises(ModelFolderError) as raised:
        open_model_folder(path)
    assert "truncated" in raised.value.message
    assert f"internlm-kit doctor --model {path}" in raised.value.fix


def test_a_shard_cut_inside_its_header_is_damaged_not_a_crash(tmp_path):
    path = make_model_folder(tmp_path / "m")
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    assert codes(inspect_model_folder(path)) == ["shard-damaged"]


def test_a_shard_named_by_the_index_but_absent_is_missing(tmp_path):
    path = make_model_folder(tmp_path / "m")
    (path / "model-00001-of-00002.safetensors").unlink()
    folder = inspect_model_folder(path)
    assert codes(folder) == ["shard-missing"]
    assert "model-00001-of-00002.safetensors" in folder.problems[0].message


def test_a_folder_without_tokenizer_files_cannot_be_opened(tmp_path):
    path = make_model_folder(tmp_path / "m", tokenizer=False)
    folder = inspect_model_folder(path)
    assert "tokenizer-missing" in codes(folder)
    assert not folder.ok


def test_a_git_lfs_pointer_instead_of_tokenizer_model_is_named(tmp_path):
    path = make_model_folder(tmp_path / "m")
    (path / "tokenizer.model").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1477754\n")
    assert "tokenizer-lfs-pointer" in codes(inspect_model_folder(path))


def test_missing_remote_code_and_a_dot_in_the_name_are_warnings(tmp_path):
    path = make_model_folder(tmp_path / "internlm2-chat-1.8b", remote_code=False)
    folder = inspect_model_folder(path)
    assert codes(folder) == ["remote-code-missing", "dot-in-folder-name"]
    assert folder.ok  # the native engine needs neither
    assert "internlm2-chat-1_8b" in folder.problem("dot-in-folder-name").fix


def test_config_problems(tmp_path):
    assert codes(inspect_model_folder(tmp_path / "nowhere")) == ["folder-missing"]
    path = make_model_folder(tmp_path / "bert", config={**CONFIG, "model_type": "bert"})
    assert "model-type-unsupported" in codes(inspect_model_folder(path))
    (path / "config.json").write_text("{not json")
    assert "config-unreadable" in codes(inspect_model_folder(path))
    (path / "config.json").unlink()
    assert "config-missing" in codes(inspect_model_folder(path))


def test_auto_map_references_name_module_files():
    assert remote_code_modules({
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None],
        "AutoModel": "other/repo--modeling_x.Model",
    }) == ["configuration_internlm2.py", "tokenization_internlm2.py"]


def test_a_single_file_model_without_index(tmp_path):
    path = make_model_folder(tmp_path / "m")
    (path / "model.safetensors.index.json").unlink()
    (path / "model-00002-of-00002.safetensors").rename(path / "model.safetensors")
    (path / "model-00001-of-00002.safetensors").unlink()
    folder = open_model_folder(path)
    assert [w.name for w in folder.weight_files] == ["model.safetensors"]
    assert json.loads((path / "config.json").read_text())["model_type"] == "internlm2"


def test_a_shard_from_another_revision_does_not_match_the_index(tmp_path):
    path = make_model_folder(tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.attention.wo.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    folder = inspect_model_folder(path)
    assert codes(folder) == ["index-mismatch"]
    assert "model.layers.0.attention.wo.weight" in folder.problems[0].message


# --- the download command a fix gives: never the default repo into someone else's folder -----------

def test_a_fix_in_a_folder_the_kit_downloaded_names_the_repo_it_recorded(hub_model_folder, tmp_path):
    from fixtures.hub import HubRepo, HubServer
    from setup_kit.download import DownloadRequest, download

    repo = "acme/tuned-chat"  # neither the default repo nor anything the folder's name suggests
    with HubServer(HubRepo.from_folder(repo, hub_model_folder)) as hub:
        download(DownloadRequest(repo=repo, source="hf", endpoint=hub.url, local_dir=tmp_path / "weights",
                                 progress=False))
    truncate(tmp_path / "weights" / "model-00002-of-00002.safetensors", 0.5)

    problem = inspect_model_folder(tmp_path / "weights").problem("shard-truncated")
    assert problem.fix.endswith(f"internlm-kit download acme/tuned-chat --local-dir {tmp_path / 'weights'}")


def test_a_fix_names_the_repo_the_folder_is_named_after_and_says_it_is_a_guess(tmp_path):
    path = make_model_folder(tmp_path / "m7" / "internlm2-chat-7b")
    truncate(path / "model-00001-of-00002.safetensors", 0.5)
    fix = inspect_model_folder(path).problem("shard-truncated").fix
    assert f"internlm-kit download internlm/internlm2-chat-7b --local-dir {path}" in fix
    assert "folder name" in fix

    converted = make_model_folder(tmp_path / "internlm2-chat-7b-llama", config={**CONFIG, "model_type": "llama"})
    truncate(converted / "model-00001-of-00002.safetensors", 0.5)
    fix = inspect_model_folder(converted).problem("shard-truncated").fix
    assert f"internlm-kit download internlm/internlm2-chat-1_8b --local-dir {converted}" in fix  # not a hub repo's name
    assert "assumed" in fix and "OWNER/NAME" not in fix


def test_a_folder_with_neither_config_nor_weights_is_one_problem(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello\n")
    folder = inspect_model_folder(tmp_path / "x")
    assert codes(folder) == ["not-a-model-folder"]
    assert "--model" in folder.problems[0].fix and "OWNER/NAME" not in folder.problems[0].fix
    with pytest.raises(ModelFolderError) as raised:
        open_model_folder(tmp_path / "x")
    assert "is not a model folder" in raised.value.message and "more problem" not in raised.value.message
