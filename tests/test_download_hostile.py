"""A repo, mirror or shared copy that lists names meant to escape the model folder, and repos that hold
identical files: `internlm-kit download` writes only inside --local-dir, refuses a hostile listing as a
whole (exit 1, one paragraph, the folder as it was), and fetches each content once.

The hub is the loopback one of tests/fixtures/hub.py, serving the listing a hostile repo or mirror would
(``HubRepo.with_files``), reached through --endpoint or HF_ENDPOINT as a user reaches a mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from fixtures.hub import HUB_REPO_ID, MiB, HubRepo, HubServer
from setup_kit.repo_paths import unsafe_reason
from test_download import PARTIALS, assert_same_files, kit_env, popen_kit, resolve_gets, run_kit

SHARD2 = "model-00002-of-00002.safetensors"
NO_HUB = "http://127.0.0.1:9"  # nothing listens there


def tree(folder: Path) -> dict | None:
    """Everything under ``folder``, hidden entries and links included: what 'untouched' compares."""
    if not os.path.lexists(folder):
        return None
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def assert_refused(proc, name: str) -> None:
    """Exit 1 and one paragraph (the message and its fix) naming the path, no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("internlm-kit: error:") == 1, proc.stderr
    paragraph = proc.stderr[proc.stderr.index("internlm-kit: error:"):]
    assert paragraph.count("\n") == 2 and "\n  fix: " in paragraph, paragraph
    assert f"a file named {name!r}" in paragraph, paragraph
    assert "broken or hostile" in paragraph and "nothing was downloaded" in paragraph, paragraph
    assert proc.stdout == ""


@pytest.fixture
def work(tmp_path) -> Path:
    """Holds the models folder and a folder beside it that nothing may write into."""
    (tmp_path / "work" / "outside").mkdir(parents=True)
    return tmp_path / "work"


def hostile_names(work: Path) -> dict[str, str]:
    """What a listing names, by the kind of trick."""
    return {
        "parent": "../escape.txt",
        "nested-parent": "a/../../escape.txt",
        "absolute": str(work / "outside" / "abs.txt"),
        "backslash": "..\\escape.txt",
        "drive": "C:/escape.txt",
        "control": "tokenizer\x1b[2Jname.json",
        "git": ".git/config",
        "bookkeeping": ".cache/internlm-kit/verified.json",
        "through-a-link": "link/escape.txt",
    }


KINDS = ["parent", "nested-parent", "absolute", "backslash", "drive", "control", "git", "bookkeeping", "through-a-link"]


def serve_hostile(hub_repo: HubRepo, name: str, payload: Path) -> HubServer:
    return HubServer(hub_repo.with_files({name: payload})).start()


@pytest.fixture
def payload(tmp_path) -> Path:
    path = tmp_path / "payload.txt"
    path.write_text("planted by a hostile repo\n")
    return path


# ---------------------------------------------------------------- the hub and mirrors


@pytest.mark.parametrize("how", ["--endpoint", "HF_ENDPOINT", "auto"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_listing_naming_a_path_outside_the_folder_is_refused_and_nothing_is_written(
        hub_repo, work, payload, tmp_path, kind, how):
    name = hostile_names(work)[kind]
    dest = work / "models" / "m"
    if kind == "through-a-link":
        dest.mkdir(parents=True)
        (dest / "link").symlink_to(work / "outside", target_is_directory=True)
    before = tree(work)
    hub = serve_hostile(hub_repo, name, payload)
    try:
        args = ["--local-dir", str(dest)] + ([] if how == "auto" else ["--source", "hf"])
        if how == "--endpoint":
            proc = run_kit([*args, "--endpoint", hub.url], kit_env(NO_HUB, tmp_path))
        else:
            proc = run_kit(args, kit_env(hub.url, tmp_path))
    finally:
        hub.stop()

    assert_refused(proc, name)
    assert tree(work) == before  # not a byte, not a .cache folder, not a directory
    assert resolve_gets(hub) == []  # refused before the first file was asked for


def test_a_hostile_listing_leaves_an_earlier_good_download_byte_identical(hub_repo, work, payload, tmp_path):
    dest = work / "models" / "m"
    with HubServer(hub_repo) as good:
        assert run_kit(["--source", "hf", "--local-dir", str(dest)], kit_env(good.url, tmp_path)).returncode == 0
    before = tree(work)
    assert "models/m/.cache/internlm-kit/verified.json" in before

    with HubServer(hub_repo.with_files({"a/../../escape.txt": payload})) as hostile:
        proc = run_kit(["--source", "hf", "--local-dir", str(dest)], kit_env(hostile.url, tmp_path))
        assert resolve_gets(hostile) == []

    assert_refused(proc, "a/../../escape.txt")
    assert tree(work) == before


def test_a_dry_run_refuses_a_hostile_listing_too(hub_repo, work, payload, tmp_path):
    with HubServer(hub_repo.with_files({"../escape.txt": payload})) as hub:
        proc = run_kit(["--source", "hf", "--local-dir", str(work / "models" / "m"), "--dry-run"],
                       kit_env(hub.url, tmp_path))

    assert_refused(proc, "../escape.txt")
    assert tree(work) == {"outside": ("dir",)}


def test_a_download_record_naming_a_path_outside_is_refused_offline(hub_repo, work, tmp_path):
    dest = work / "models" / "m"
    with HubServer(hub_repo) as hub:
        env = kit_env(hub.url, tmp_path)
        assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    record = dest / ".cache" / "internlm-kit" / "manifest.json"
    data = json.loads(record.read_text())
    data["files"].append({"path": "../../outside/secret", "size": 4, "sha256": None, "git_sha1": "0" * 40})
    record.write_text(json.dumps(data))
    (work / "outside" / "secret").write_text("mine")

    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], dict(env, HF_HUB_OFFLINE="1"))

    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "a file named '../../outside/secret'" in proc.stderr and f"delete {record}" in proc.stderr


def test_a_listed_file_the_hub_then_denies_is_called_a_broken_or_hostile_listing(hub, tmp_path):
    hub.fail(404, match="*/resolve/*/tokenizer.model")

    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m")], kit_env(hub.url, tmp_path))

    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "lists internlm/internlm2-chat-1_8b/tokenizer.model but answers 404" in proc.stderr
    assert "does not match its own files" in proc.stderr and "broken or hostile" in proc.stderr
    assert "hf-mirror.com" not in proc.stderr  # another mirror of a self-contradicting repo is no fix


# ---------------------------------------------------------------- a local copy (--from)


@pytest.mark.parametrize("name", ["..\\escape.txt", "tokenizer\x1b[2Jname.json", "sub/extra.json"])
def test_a_local_copy_with_a_name_that_would_escape_is_refused(hub_model_folder, work, tmp_path, name):
    src = tmp_path / "share" / "m"
    shutil.copytree(hub_model_folder, src)
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text("{}")
    dest = work / "models" / "m"
    if name.startswith("sub/"):  # the destination already holds a link that leads out
        dest.mkdir(parents=True)
        (dest / "sub").symlink_to(work / "outside", target_is_directory=True)
    before = tree(work)

    proc = run_kit(["--source", "local", "--from", str(src), "--local-dir", str(dest)], kit_env(NO_HUB, tmp_path))

    assert_refused(proc, name)
    assert tree(work) == before
    if name.startswith("sub/"):
        assert "goes through the link" in proc.stderr


# ---------------------------------------------------------------- identical files


@pytest.fixture(scope="session")
def twins_folder(hub_model_folder, tmp_path_factory) -> Path:
    """The model repo plus copies of its files elsewhere in it (a tokenizer in a subfolder, a backup
    shard) and several empty files: contents that appear at more than one path."""
    folder = tmp_path_factory.mktemp("twins") / "repo"
    shutil.copytree(hub_model_folder, folder)
    for copy, original in (("sub/tokenizer.model", "tokenizer.model"), ("tokenizer-copy.model", "tokenizer.model"),
                           (f"backup/{SHARD2}", SHARD2), ("sub/config.json", "config.json")):
        (folder / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / original, folder / copy)
    for empty in ("empty-a.txt", "b/empty.txt", "c/empty.txt"):
        (folder / empty).parent.mkdir(parents=True, exist_ok=True)
        (folder / empty).write_bytes(b"")
    return folder


@pytest.fixture
def twins(twins_folder):
    repo = HubRepo.from_folder(HUB_REPO_ID, twins_folder)
    with HubServer(repo) as hub:
        yield hub, repo


def contents(repo: HubRepo) -> dict[str, list[str]]:
    """The repo's paths grouped by content."""
    groups: dict[str, list[str]] = {}
    for f in repo.files.values():
        groups.setdefault(f.etag, []).append(f.path)
    return groups


def assert_each_content_fetched_once(hub: HubServer, repo: HubRepo) -> None:
    for paths in contents(repo).values():
        assert sum(hub.served[p] for p in paths) == repo.files[paths[0]].size, paths


@pytest.mark.parametrize("attempt", range(5))
def test_identical_files_are_fetched_once_and_a_rerun_transfers_nothing(twins, tmp_path, attempt):
    hub, repo = twins
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)

    first = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert first.returncode == 0, first.stderr
    assert "the same as another in the repo" in first.stderr
    assert_same_files(dest, repo)
    assert_each_content_fetched_once(hub, repo)
    for paths in contents(repo).values():  # one content, one file on disk
        assert len({(dest / p).stat().st_ino for p in paths}) == 1, paths
    hub.reset_counters()

    again = run_kit(["--source", "hf", "--local-dir", str(dest), "--json"], env)

    assert again.returncode == 0, again.stderr
    assert resolve_gets(hub) == [] and json.loads(again.stdout)["transferred"] == 0


@pytest.mark.parametrize("attempt", range(5))
def test_identical_files_resume_after_a_kill(twins, tmp_path, attempt):
    hub, repo = twins
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="60")  # the pause must not look like a dead link
    twins_of_shard = [SHARD2, f"backup/{SHARD2}"]
    sha = repo.files[SHARD2].sha256
    faults = [hub.pause(p, after=4 * MiB) for p in twins_of_shard]  # whichever of the two is fetched
    proc = popen_kit(["--source", "hf", "--local-dir", str(dest)], env)
    try:
        deadline = time.monotonic() + 60
        while not any(f.reached.is_set() for f in faults) and time.monotonic() < deadline and proc.poll() is None:
            faults[0].reached.wait(0.05)
        assert any(f.reached.is_set() for f in faults), "the kit never got that far"
        assert sum(f.reached.is_set() for f in faults) == 1  # one writer for the content
        deadline = time.monotonic() + 30
        while (dest / PARTIALS / f"{sha}.part").stat().st_size < 4 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = (dest / PARTIALS / f"{sha}.part").stat().st_size
    assert 0 < kept <= 4 * MiB  # what arrived before the kill (all of it, unless the machine is slow)
    hub.clear_faults()
    hub.reset_counters()

    again = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert sum(hub.served[p] for p in twins_of_shard) == repo.files[SHARD2].size - kept
    assert_same_files(dest, repo)
    assert not list((dest / PARTIALS).glob("*.part"))


def test_a_copy_deleted_or_replaced_is_placed_again_from_its_twin_without_transfer(twins, tmp_path):
    hub, repo = twins
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    (dest / "sub" / "tokenizer.model").unlink()
    damaged = bytearray((dest / "tokenizer-copy.model").read_bytes())
    damaged[10] ^= 0xFF
    (dest / "tokenizer-copy.model").unlink()  # a new file of the same size: only a hash can tell
    (dest / "tokenizer-copy.model").write_bytes(bytes(damaged))
    hub.reset_counters()

    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    assert "tokenizer-copy.model does not match" in proc.stderr
    assert sum(hub.served.values()) == 0 and json.loads(proc.stdout)["transferred"] == 0
    assert_same_files(dest, repo)


def test_a_dry_run_shows_identical_files_as_links(twins, tmp_path):
    hub, repo = twins
    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m"), "--dry-run"],
                   kit_env(hub.url, tmp_path, COLUMNS="500"))

    assert proc.returncode == 0, proc.stderr
    actions = {row.split()[2]: row.split()[0] for row in proc.stdout.splitlines() if len(row.split()) == 3}
    for paths in contents(repo).values():
        assert sorted(actions[p] for p in paths) == ["fetch"] + ["link"] * (len(paths) - 1), paths


# ---------------------------------------------------------------- one rule for every reader of repo names


@pytest.mark.parametrize("name", ["config.json", "sub/dir/model.bin", "中文/分词.model", "a..b", "..hidden",
                                  ".gitattributes", ".cache-not-ours/x", "name with spaces.txt"])
def test_plain_relative_names_are_safe(name, tmp_path):
    assert unsafe_reason(name, tmp_path) is None


@pytest.mark.parametrize("name", ["", "../x", "a/../../x", "a/..", "/abs/x", "..\\x", "a\\b", "C:x", "C:/x", "c:\\x",
                                  "//server/share/x", "a//b", "./x", "a/./b", "x\x00.json", "x\ny", "x\x7f",
                                  ".git/hooks/post-checkout", "sub/.GIT/config", ".cache/huggingface/download/x",
                                  ".cache/internlm-kit/manifest.json"])
def test_names_that_could_leave_the_folder_or_plant_something_are_unsafe(name, tmp_path):
    assert unsafe_reason(name, tmp_path)


def test_a_name_through_a_link_inside_the_folder_is_unsafe_only_when_the_link_leads_out(tmp_path):
    folder, outside = tmp_path / "m", tmp_path / "outside"
    (folder / "real").mkdir(parents=True)
    outside.mkdir()
    (folder / "out").symlink_to(outside, target_is_directory=True)
    (folder / "in").symlink_to(folder / "real", target_is_directory=True)

    assert "goes through the link" in unsafe_reason("out/x.json", folder)
    assert unsafe_reason("in/x.json", folder) is None


def test_the_doctor_does_not_read_a_shard_the_index_places_outside_the_folder(tiny_internlm2_dir, tmp_path):
    from setup_kit.modelfolder import inspect_model_folder

    folder = tmp_path / "m"
    shutil.copytree(tiny_internlm2_dir, folder)
    weights = sorted(folder.glob("*.safetensors"))
    shutil.move(weights[0], tmp_path / "elsewhere.safetensors")  # a real shard, outside the folder
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.tok_embeddings.weight": "../elsewhere.safetensors"}}))

    found = inspect_model_folder(folder)

    problem = found.problem("index-unsafe-path")
    assert problem and problem.blocking and "'../elsewhere.safetensors'" in problem.message
    assert not any(w.tensors for w in found.weight_files)  # its header was never read
