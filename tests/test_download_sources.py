"""`internlm-kit download` from a copy already on the machine, and `auto` choosing between sources.

The shared folder is laid out as on InternStudio: `<root>/new_models/Shanghai_AI_Laboratory/<name>`,
reached through a link (`/root/share` -> `/share` there), its files symlinks into a blob store as in
a huggingface cache. INTERNLM_KIT_SHARE_ROOTS points the kit at it instead of /root/share.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from test_download import assert_clear_failure, assert_same_files, kit_env, run_kit

SHARD1 = "model-00001-of-00002.safetensors"
NO_HUB = "http://127.0.0.1:9"  # nothing listens there: the hub is down


@pytest.fixture
def share_root(hub_model_folder, tmp_path) -> Path:
    """A shared model store whose files are symlinks into blobs, reached through a linked root."""
    real_root = tmp_path / "share"
    model = real_root / "new_models" / "Shanghai_AI_Laboratory" / "internlm2-chat-1_8b"
    blobs = real_root / "blobs"
    model.mkdir(parents=True)
    blobs.mkdir()
    for src in hub_model_folder.iterdir():
        if src.is_file():
            blob = blobs / f"blob-{src.name}"
            shutil.copyfile(src, blob)
            (model / src.name).symlink_to(os.path.relpath(blob, model))
    linked = tmp_path / "root-share"
    linked.symlink_to(real_root)
    return linked


def test_local_source_finds_the_shared_folder_and_leaves_real_files(share_root, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(NO_HUB, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root))

    proc = run_kit(["--source", "local", "--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["source"] == "local" and result["verified"] is True
    assert_same_files(dest, hub_repo)  # regular files, same bytes
    shutil.rmtree(tmp_path / "share")  # the share goes away: nothing in the model folder dangles
    assert all((dest / f).is_file() for f in hub_repo.files)


def test_local_source_hard_links_on_the_same_filesystem(share_root, hub_model_folder, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(NO_HUB, tmp_path)

    proc = run_kit(["--source", "local", "--from", str(share_root / "new_models/Shanghai_AI_Laboratory/internlm2-chat-1_8b"),
                    "--local-dir", str(dest)], env)

    assert proc.returncode == 0, proc.stderr
    blob = share_root / "blobs" / f"blob-{SHARD1}"
    assert (dest / SHARD1).stat().st_ino == blob.stat().st_ino
    assert "linked" in proc.stderr
    assert proc.stdout.strip() == str(dest)


def test_local_source_refuses_a_truncated_shared_copy(hub_model_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hub_model_folder, broken)
    with open(broken / SHARD1, "r+b") as f:
        f.truncate(1_000_000)

    proc = run_kit(["--source", "local", "--from", str(broken), "--local-dir", str(tmp_path / "m")],
                   kit_env(NO_HUB, tmp_path))

    assert_clear_failure(proc, SHARD1, "truncated")
    assert not (tmp_path / "m" / SHARD1).exists()


def test_local_source_without_a_copy_says_where_it_looked(tmp_path):
    proc = run_kit(["--source", "local", "--local-dir", str(tmp_path / "m")],
                   kit_env(NO_HUB, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(tmp_path / "nothing")))
    assert_clear_failure(proc, "no local copy", "--from")


def test_auto_prefers_the_local_copy_then_checks_it_against_the_hub(hub, share_root, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root))

    proc = run_kit(["--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    assert "local copy found" in proc.stderr and "checking every file against" in proc.stderr
    assert sum(hub.served.values()) == 0  # every byte came from the share, every hash from the hub
    assert json.loads(proc.stdout)["verification"].startswith("size and")
    assert_same_files(dest, hub_repo)


def test_auto_with_a_shared_copy_that_differs_from_the_hub_fetches_that_file_and_leaves_the_share(
        hub, share_root, hub_repo, tmp_path):
    """One shard of the shared copy differs from the hub's (same size, one byte flipped): auto takes
    the rest from the share, fetches that shard alone from the hub, and never writes into the share."""
    shared = share_root / "new_models" / "Shanghai_AI_Laboratory" / "internlm2-chat-1_8b" / SHARD1
    blob = shared.resolve()
    altered = bytearray(blob.read_bytes())
    altered[len(altered) // 2] ^= 0xFF
    blob.write_bytes(bytes(altered))
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root))

    proc = run_kit(["--local-dir", str(dest)], env)

    assert proc.returncode == 0, proc.stderr
    assert f"{SHARD1} does not match the hub's" in proc.stderr and "fetching it again" in proc.stderr
    fetched = {path: n for path, n in hub.served.items() if n}
    assert list(fetched) == [SHARD1] and fetched[SHARD1] == len(altered)  # that file alone, whole
    assert_same_files(dest, hub_repo)
    assert blob.read_bytes() == bytes(altered)  # the share's copy is as it was


def test_auto_keeps_a_local_copy_when_the_hub_is_down(share_root, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--local-dir", str(dest)], kit_env(NO_HUB, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root)))

    assert proc.returncode == 0, proc.stderr
    assert "hub is not reachable" in proc.stderr
    assert_same_files(dest, hub_repo)


def test_auto_without_local_copy_uses_the_hub(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--local-dir", str(dest)], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert "no local copy" in proc.stderr
    assert_same_files(dest, hub_repo)


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None,
                    reason="modelscope is installed: this checks the message shown without it")
def test_auto_falls_back_to_modelscope_when_the_hub_is_down_and_says_how_to_get_it(tmp_path):
    proc = run_kit(["--local-dir", str(tmp_path / "m")], kit_env(NO_HUB, tmp_path))

    assert_clear_failure(proc, "no local copy", "hub unreachable", "trying ModelScope",
                         "Shanghai_AI_Laboratory/internlm2-chat-1_8b", "pip install modelscope")


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None,
                    reason="modelscope is installed: this checks the message shown without it")
def test_modelscope_source_without_the_package_says_how_to_install_it(tmp_path):
    proc = run_kit(["--source", "modelscope", "--local-dir", str(tmp_path / "m")], kit_env(NO_HUB, tmp_path))
    assert_clear_failure(proc, "pip install modelscope")


FAKE_MODELSCOPE = '''
"""Stand-in for the modelscope package: copies a folder, records how it was called."""
import json, os, shutil


def snapshot_download(model_id, revision=None, local_dir=None, allow_patterns=None, **kwargs):
    with open(os.environ["FAKE_MODELSCOPE_CALLS"], "a") as log:
        log.write(json.dumps({"model_id": model_id, "revision": revision, "local_dir": local_dir}) + "\\n")
    shutil.copytree(os.environ["FAKE_MODELSCOPE_SOURCE"], local_dir, dirs_exist_ok=True)
    return local_dir
'''

FAKE_MODELSCOPE_API = '''
"""Stand-in for modelscope.hub.api: lists the folder snapshot_download copies."""
import os


class HubApi:
    def get_model_files(self, model_id, revision="master", recursive=True):
        root = os.environ["FAKE_MODELSCOPE_SOURCE"]
        return [{"Path": name, "Type": "blob"} for name in sorted(os.listdir(root))]
'''


def test_auto_uses_modelscope_when_the_hub_is_down_and_checks_what_it_got(hub_model_folder, hub_repo, tmp_path):
    package = tmp_path / "site" / "modelscope"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_MODELSCOPE)
    (package / "hub").mkdir()
    (package / "hub" / "__init__.py").write_text("")
    (package / "hub" / "api.py").write_text(FAKE_MODELSCOPE_API)
    calls = tmp_path / "calls.jsonl"
    dest = tmp_path / "m"
    env = kit_env(NO_HUB, tmp_path, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
                  FAKE_MODELSCOPE_CALLS=str(calls), FAKE_MODELSCOPE_SOURCE=str(hub_model_folder))

    proc = run_kit(["--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    assert "trying ModelScope" in proc.stderr
    assert json.loads(proc.stdout)["source"] == "modelscope"
    assert json.loads(calls.read_text()) == {"model_id": "Shanghai_AI_Laboratory/internlm2-chat-1_8b",
                                             "revision": None, "local_dir": str(dest)}
    assert_same_files(dest, hub_repo)


def test_local_source_with_include_copies_only_the_selection(share_root, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "local", "--include", "*.json", "--include", SHARD1, "--local-dir", str(dest)],
                   kit_env(NO_HUB, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root)))

    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in dest.iterdir() if p.is_file()} == {
        "config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer_config.json", SHARD1}


def test_auto_on_a_verified_folder_does_not_copy_again(hub, share_root, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root))
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    inode = (dest / SHARD1).stat().st_ino
    hub.reset_counters()

    proc = run_kit(["--local-dir", str(dest)], env)

    assert proc.returncode == 0, proc.stderr
    assert "already holds a verified download" in proc.stderr
    assert (dest / SHARD1).stat().st_ino == inode and sum(hub.served.values()) == 0


@pytest.mark.parametrize("source", [["--from", "FROM"], ["--source", "local", "--from", "FROM"], []])
def test_dry_run_from_a_local_copy_lists_it_without_the_hub(hub, share_root, hub_repo, tmp_path, source):
    """--from DIR, --source local, or auto finding the shared copy: the listing is the copy's files."""
    copy = share_root / "new_models/Shanghai_AI_Laboratory/internlm2-chat-1_8b"
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, INTERNLM_KIT_SHARE_ROOTS=str(share_root), COLUMNS="500")  # no wrapped lines

    proc = run_kit([*(str(copy) if a == "FROM" else a for a in source), "--local-dir", str(dest), "--dry-run"], env)

    assert proc.returncode == 0, proc.stderr
    *rows, total = proc.stdout.splitlines()
    assert sorted(row.split() for row in rows) == sorted(["link", f"{f.size:,}", f.path] for f in hub_repo.files.values())
    assert total.strip() == f"total {sum(f.size for f in hub_repo.files.values()):,} bytes; destination {dest}"
    assert not dest.exists()
    assert hub.requests == []  # not even the listing
