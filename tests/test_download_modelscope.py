"""`internlm-kit download` through the REAL modelscope package (from PyPI), against the ModelScope hub
of tests/fixtures/modelscope_hub.py, reached the way a user reaches a private hub: MODELSCOPE_ENDPOINT.

The kit runs from throwaway venvs (built once per session) holding the kit itself and modelscope: one
with huggingface_hub too (what `pip install internlm-kit[chat] modelscope` gives, less torch), one
without it (the core install plus modelscope). Bytes are counted at the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.modelscope_hub import MODELSCOPE_ID, ModelScopeHub
from fixtures.venvs import make_venv, pip_install
from test_download import assert_clear_failure
from test_download_hostile import assert_refused, tree

pytestmark = pytest.mark.slow  # builds venvs from the package index

ROOT = Path(__file__).resolve().parents[1]
MODELSCOPE = "modelscope==1.40.2"  # the release whose client the fixture hub was written against
HUGGINGFACE_HUB = "huggingface_hub==2.4.0"  # as in the project venv
NO_HUB = "http://127.0.0.1:9"  # nothing listens there
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="session")
def modelscope_venv(tmp_path_factory) -> Path:
    """The kit, modelscope and huggingface_hub; returns the venv's bin folder."""
    python = make_venv(tmp_path_factory.mktemp("venv-modelscope") / "venv")
    pip_install(python, str(ROOT), MODELSCOPE, HUGGINGFACE_HUB)
    return python.parent


@pytest.fixture(scope="session")
def modelscope_only_venv(tmp_path_factory) -> Path:
    """The kit's core install and modelscope, no huggingface_hub; returns the venv's bin folder."""
    python = make_venv(tmp_path_factory.mktemp("venv-modelscope-only") / "venv")
    pip_install(python, str(ROOT), MODELSCOPE)
    assert subprocess.run([str(python), "-c", "import huggingface_hub"], capture_output=True).returncode != 0
    return python.parent


def ms_env(modelscope_url: str, tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, MODELSCOPE_ENDPOINT=modelscope_url, MODELSCOPE_CACHE=str(tmp_path / "ms-cache"),
               MODELSCOPE_HOME=str(tmp_path / "ms-home"), MODELSCOPE_CREDENTIALS_PATH=str(tmp_path / "ms-credentials"),
               HF_ENDPOINT=NO_HUB, HF_HOME=str(tmp_path / "hf-home"), INTERNLM_KIT_MODELS=str(tmp_path / "models"),
               INTERNLM_KIT_SHARE_ROOTS="", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    for name in ("HF_HUB_OFFLINE", "MODELSCOPE_DOMAIN", "MODELSCOPE_API_TOKEN", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(extra)
    return env


def kit(venv_bin: Path, args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv_bin / "internlm-kit"), "download", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_files(dest: Path, repo) -> None:
    for f in repo.files.values():
        got = dest / f.path
        assert got.is_file(), f.path
        assert hashlib.sha256(got.read_bytes()).hexdigest() == f.sha256, f.path


def doctor_model_checks(folder: Path) -> dict:
    """The doctor's model checks on ``folder``, run by the project's own kit (torch and transformers)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("internlm-kit")), "doctor", "--json", "--model", str(folder),
                           "--only", "model.config,model.tokenizer,model.weights"],
                          capture_output=True, text=True, timeout=180)
    assert "Traceback" not in proc.stderr, proc.stderr
    return {c["id"]: c["status"] for c in json.loads(proc.stdout)["checks"]}


def test_modelscope_source_downloads_through_the_real_package_and_the_doctor_accepts_the_folder(
        modelscope_venv, modelscope_hub, modelscope_repo, tmp_path):
    dest = tmp_path / "internlm2-chat-1_8b"

    proc = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest), "--json"],
               ms_env(modelscope_hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    total = sum(f.size for f in modelscope_repo.files.values())
    assert result["source"] == "modelscope" and result["verified"] is True and result["revision"] == "master"
    assert {f["path"] for f in result["files"]} == set(modelscope_repo.files)
    assert result["bytes"] == total and result["transferred"] == total
    assert dict(modelscope_hub.served) == {f.path: f.size for f in modelscope_repo.files.values()}
    assert sorted(modelscope_hub.file_gets()) == sorted(modelscope_repo.files)  # each file once, from here
    assert_same_files(dest, modelscope_repo)
    assert doctor_model_checks(dest) == {"model.config": "ok", "model.tokenizer": "ok", "model.weights": "ok"}


def test_a_second_run_transfers_nothing(modelscope_venv, modelscope_hub, modelscope_repo, tmp_path):
    dest = tmp_path / "m"
    env = ms_env(modelscope_hub.url, tmp_path)
    assert kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest)], env).returncode == 0
    modelscope_hub.reset_counters()

    proc = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    assert modelscope_hub.file_gets() == [] and sum(modelscope_hub.served.values()) == 0
    result = json.loads(proc.stdout)
    assert result["verified"] is True and result["transferred"] == 0
    assert_same_files(dest, modelscope_repo)


def test_a_damaged_file_on_disk_is_fetched_again(modelscope_venv, modelscope_hub, modelscope_repo, tmp_path):
    dest = tmp_path / "m"
    env = ms_env(modelscope_hub.url, tmp_path)
    assert kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest)], env).returncode == 0
    data = bytearray((dest / SHARD2).read_bytes())
    data[100] ^= 0xFF  # same size, one byte off: only the sha256 can tell
    (dest / SHARD2).write_bytes(bytes(data))
    modelscope_hub.reset_counters()

    proc = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    assert modelscope_hub.file_gets() == [SHARD2]
    assert json.loads(proc.stdout)["transferred"] == modelscope_repo.files[SHARD2].size
    assert_same_files(dest, modelscope_repo)


def test_bytes_that_do_not_match_the_listed_sha256_are_refused(modelscope_venv, modelscope_hub, tmp_path):
    dest = tmp_path / "m"
    modelscope_hub.corrupt(SHARD2)

    proc = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest)], ms_env(modelscope_hub.url, tmp_path))

    assert_clear_failure(proc, f"ModelScope could not provide 1 file of {MODELSCOPE_ID}", SHARD2,
                         "Hash mismatch", "do not match the sha256/size it lists")
    assert "check the connection" not in proc.stderr
    assert not (dest / SHARD2).exists()
    assert not list(dest.glob("*.incomplete"))  # nothing that looks reusable is left behind
    assert proc.stdout == ""


def test_include_fetches_only_the_selection_and_does_not_ask_for_the_rest(modelscope_venv, modelscope_hub,
                                                                          modelscope_repo, tmp_path):
    dest = tmp_path / "m"

    proc = kit(modelscope_venv, ["--source", "modelscope", "--include", "*.json", "--local-dir", str(dest), "--json"],
               ms_env(modelscope_hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    selected = {p for p in modelscope_repo.files if p.endswith(".json")}
    assert {f["path"] for f in json.loads(proc.stdout)["files"]} == selected
    assert set(modelscope_hub.file_gets()) == selected
    assert {p.name for p in dest.iterdir()} == selected


def test_exclude_reaches_modelscope_and_the_index_naming_left_out_shards_still_checks(
        modelscope_venv, modelscope_hub, modelscope_repo, tmp_path):
    dest = tmp_path / "m"

    proc = kit(modelscope_venv, ["--source", "modelscope", "--exclude", "*.safetensors", "--local-dir", str(dest),
                                 "--json"], ms_env(modelscope_hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    selected = {p for p in modelscope_repo.files if not p.endswith(".safetensors")}
    assert "model.safetensors.index.json" in selected
    assert {f["path"] for f in json.loads(proc.stdout)["files"]} == selected
    assert set(modelscope_hub.file_gets()) == selected  # modelscope itself was told to leave the shards
    assert not list(dest.glob("*.safetensors"))


def test_an_unreachable_modelscope_says_which_endpoint_failed(modelscope_venv, tmp_path):
    proc = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(tmp_path / "m")],
               ms_env(NO_HUB, tmp_path, MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS="1"))

    assert_clear_failure(proc, f"ModelScope could not provide {MODELSCOPE_ID}", f"check the connection to {NO_HUB}")


def test_auto_falls_back_to_the_real_package_when_the_hub_is_down(modelscope_venv, modelscope_hub, modelscope_repo,
                                                                  tmp_path):
    dest = tmp_path / "m"

    token = "hf_token_meant_for_the_hub_only"
    proc = kit(modelscope_venv, ["--local-dir", str(dest), "--json", "--token", token],
               ms_env(modelscope_hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert "hub unreachable" in proc.stderr and f"trying ModelScope ({MODELSCOPE_ID})" in proc.stderr
    # A Hugging Face token is not handed to another service on the way.
    assert modelscope_hub.headers and not any(token in value for h in modelscope_hub.headers for value in h.values())
    assert token not in proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["source"] == "modelscope" and result["verified"] is True
    assert sorted(modelscope_hub.file_gets()) == sorted(modelscope_repo.files)
    assert_same_files(dest, modelscope_repo)


def test_auto_without_huggingface_hub_uses_modelscope(modelscope_only_venv, modelscope_hub, modelscope_repo, tmp_path):
    dest = tmp_path / "m"

    proc = kit(modelscope_only_venv, ["--local-dir", str(dest), "--json"], ms_env(modelscope_hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert "huggingface_hub is not installed" in proc.stderr and "trying ModelScope" in proc.stderr
    assert json.loads(proc.stdout)["source"] == "modelscope"
    assert_same_files(dest, modelscope_repo)


def test_hf_source_without_huggingface_hub_says_how_to_get_it(modelscope_only_venv, tmp_path):
    proc = kit(modelscope_only_venv, ["--source", "hf", "--local-dir", str(tmp_path / "m")], ms_env(NO_HUB, tmp_path))

    assert_clear_failure(proc, "huggingface_hub", "pip install huggingface_hub", "--source modelscope")


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "ABS", "..\\escape.txt", "link/escape.txt"])
def test_a_modelscope_listing_naming_a_path_outside_the_folder_is_refused_and_nothing_is_written(
        modelscope_venv, modelscope_repo, tmp_path, name):
    work = tmp_path / "work"
    (work / "outside").mkdir(parents=True)
    name = str(work / "outside" / "abs.txt") if name == "ABS" else name
    dest = work / "models" / "m"
    if name.startswith("link/"):
        dest.mkdir(parents=True)
        (dest / "link").symlink_to(work / "outside", target_is_directory=True)
    payload = tmp_path / "payload.txt"
    payload.write_text("planted\n")
    before = tree(work)
    with ModelScopeHub(modelscope_repo.with_files({name: payload})) as hub:
        proc = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest)], ms_env(hub.url, tmp_path))
        assert hub.file_gets() == []

    assert_refused(proc, name)
    assert tree(work) == before


@pytest.mark.parametrize("attempt", range(3))
def test_identical_files_from_modelscope_download_and_a_rerun_transfers_nothing(
        modelscope_venv, modelscope_repo, tiny_internlm2_dir, tmp_path, attempt):
    twins = {"sub/tokenizer.model": tiny_internlm2_dir / "tokenizer.model",
             "tokenizer-copy.model": tiny_internlm2_dir / "tokenizer.model",
             "sub/config.json": tiny_internlm2_dir / "config.json"}
    repo = modelscope_repo.with_files(twins)
    dest = tmp_path / "m"
    with ModelScopeHub(repo) as hub:
        env = ms_env(hub.url, tmp_path)
        first = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest)], env)
        assert first.returncode == 0, first.stderr
        assert_same_files(dest, repo)
        hub.reset_counters()
        again = kit(modelscope_venv, ["--source", "modelscope", "--local-dir", str(dest), "--json"], env)

    assert again.returncode == 0, again.stderr
    assert hub.file_gets() == [] and json.loads(again.stdout)["transferred"] == 0
