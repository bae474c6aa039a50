"""`internlm-kit download` from a hub: the loopback hub in tests/fixtures/hub.py, reached the way a
user reaches a mirror (HF_ENDPOINT / --endpoint). Bytes are counted at the server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.hub import HUB_REPO_ID, MiB, HubRepo, HubServer
from setup_kit.download import DownloadRequest, download
from setup_kit.errors import KitError

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
PARTIALS = Path(".cache") / "internlm-kit" / "partial"


def kit_env(hub_url: str, tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub_url, HF_HOME=str(tmp_path / "hf-home"),
               INTERNLM_KIT_MODELS=str(tmp_path / "models"), INTERNLM_KIT_SHARE_ROOTS="",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env.pop("HF_HUB_OFFLINE", None)
    env.update(extra)
    return env


def run_kit(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "setup_kit", "download", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def popen_kit(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "setup_kit", "download", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_files(dest: Path, repo: HubRepo) -> None:
    for f in repo.files.values():
        got = dest / f.path
        assert got.is_file() and not got.is_symlink(), f.path
        assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(f.source.read_bytes()).hexdigest(), f.path


def assert_clear_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "internlm-kit: error:" in proc.stderr and "fix:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def resolve_gets(hub: HubServer) -> list[str]:
    return [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]


def partial_size(dest: Path, sha256: str | None = None) -> int:
    """Bytes kept in the kit's partial files (of one file, named by its sha256, when given)."""
    parts = list((dest / PARTIALS).glob(f"{sha256 or '*'}.part"))
    return sum(p.stat().st_size for p in parts)


# ---------------------------------------------------------------- a plain download


def test_full_download_fetches_every_file_once_and_prints_the_path_last(hub, hub_repo, tmp_path):
    dest = tmp_path / "internlm2-chat-1_8b"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(dest)
    assert_same_files(dest, hub_repo)
    assert dict(hub.served) == {f.path: f.size for f in hub_repo.files.values()}
    assert "verified" in proc.stderr


def test_default_folder_and_repo_come_from_the_kit_defaults(hub, hub_repo, tmp_path):
    proc = run_kit(["--source", "hf"], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "models" / "internlm2-chat-1_8b"
    assert proc.stdout.strip() == str(dest)
    assert_same_files(dest, hub_repo)


def test_rerun_on_a_verified_folder_transfers_nothing(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    hub.reset_counters()

    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--json"], env)

    assert proc.returncode == 0, proc.stderr
    assert resolve_gets(hub) == [] and sum(hub.served.values()) == 0
    result = json.loads(proc.stdout)
    assert result["verified"] is True and result["transferred"] == 0


def test_json_result_names_repo_revision_path_files_bytes_verified(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--json"], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["repo"] == HUB_REPO_ID and result["revision"] == "main" and result["commit"] == hub_repo.commit
    assert result["path"] == str(dest) and result["verified"] is True
    assert result["bytes"] == sum(f.size for f in hub_repo.files.values())
    assert {f["path"] for f in result["files"]} == set(hub_repo.files)
    shard = next(f for f in result["files"] if f["path"] == SHARD1)
    assert shard["sha256"] == hub_repo.files[SHARD1].sha256


def test_dry_run_lists_files_and_sizes_and_changes_nothing(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--dry-run"], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    for f in hub_repo.files.values():
        assert f.path in proc.stdout and f"{f.size:,}" in proc.stdout
    assert f"{sum(f.size for f in hub_repo.files.values()):,}" in proc.stdout
    assert not dest.exists()
    assert resolve_gets(hub) == []


def test_include_fetches_only_matching_files_and_a_revision_pins_the_commit(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--include", "*.json",
                    "--revision", hub_repo.commit], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    got = {p.name for p in dest.iterdir() if p.is_file()}
    assert got == {p for p in hub_repo.files if p.endswith(".json")}
    assert all(f"/resolve/{hub_repo.commit}/" in p for p in resolve_gets(hub))


def test_endpoint_option_wins_over_hf_endpoint(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env("http://127.0.0.1:9", tmp_path)  # nothing listens there
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--endpoint", hub.url], env)

    assert proc.returncode == 0, proc.stderr
    assert_same_files(dest, hub_repo)


def test_a_mirror_without_file_metadata_is_verified_from_per_file_headers(hub, hub_repo, tmp_path):
    hub.file_metadata = False  # the repo listing names files only: sizes and hashes come from HEAD
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--json"], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    heads = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "HEAD"}
    assert heads == set(hub_repo.files)
    shard = next(f for f in json.loads(proc.stdout)["files"] if f["path"] == SHARD1)
    assert shard["sha256"] == hub_repo.files[SHARD1].sha256
    assert_same_files(dest, hub_repo)


def test_result_is_a_model_folder_the_doctor_accepts(tiny_internlm2_dir, tmp_path):
    from setup_kit.modelfolder import inspect_model_folder

    repo = HubRepo.from_folder(HUB_REPO_ID, tiny_internlm2_dir)
    with HubServer(repo) as hub:
        result = download(DownloadRequest(source="hf", endpoint=hub.url, local_dir=tmp_path / "tiny", progress=False))
    assert result.verified
    folder = inspect_model_folder(tmp_path / "tiny")
    assert folder.ok, [p.__dict__ for p in folder.problems]


# ---------------------------------------------------------------- interruptions


def test_a_cut_connection_is_resumed_within_the_run(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    hub.cut(SHARD1, after=11 * MiB)

    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert_same_files(dest, hub_repo)
    assert hub.served[SHARD1] == hub_repo.files[SHARD1].size  # no byte sent twice
    ranges = [r for m, p, r in hub.requests if p.endswith(SHARD1) and m == "GET"]
    assert ranges[0] is None and ranges[1] and ranges[1].startswith("bytes=")


def test_network_cut_then_hub_down_resumes_next_run_moving_only_missing_bytes(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    hub.cut(SHARD1, after=11 * MiB, then_fail=500)  # the retry after the cut finds the hub down

    first = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert_clear_failure(first, "500", "--endpoint", "modelscope", "--from")
    kept = partial_size(dest, hub_repo.files[SHARD1].sha256)
    assert kept == 11 * MiB and not (dest / SHARD1).exists()
    hub.clear_faults()
    hub.reset_counters()

    second = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert second.returncode == 0, second.stderr
    assert hub.served[SHARD1] == hub_repo.files[SHARD1].size - kept
    assert all(hub.served[f] == 0 for f in hub_repo.files if f != SHARD1)  # the rest were already done
    assert_same_files(dest, hub_repo)
    assert partial_size(dest) == 0  # no partial left behind


def test_a_killed_process_resumes_moving_only_missing_bytes(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="60")  # the pause must not look like a dead link
    sha = hub_repo.files[SHARD1].sha256
    fault = hub.pause(SHARD1, after=11 * MiB)
    proc = popen_kit(["--source", "hf", "--local-dir", str(dest)], env)
    try:
        assert fault.reached.wait(30), "the kit never got that far"
        deadline = time.monotonic() + 20
        while partial_size(dest, sha) < 11 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = partial_size(dest, sha)
    assert kept == 11 * MiB  # everything that arrived before the kill was kept
    hub.clear_faults()
    hub.reset_counters()

    again = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert again.returncode == 0, again.stderr
    assert hub.served[SHARD1] == hub_repo.files[SHARD1].size - kept
    assert "resuming" in again.stderr
    assert_same_files(dest, hub_repo)


def test_an_orphan_left_by_a_killed_hf_download_is_continued(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    f = hub_repo.files[SHARD2]
    orphan_dir = dest / ".cache" / "huggingface" / "download"
    orphan_dir.mkdir(parents=True)
    orphan = orphan_dir / f"abcdef.{f.sha256}.1a2b3c4d.incomplete"
    orphan.write_bytes(f.source.read_bytes()[: 4 * MiB])

    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert hub.served[SHARD2] == f.size - 4 * MiB
    assert not orphan.exists()
    assert_same_files(dest, hub_repo)


# ---------------------------------------------------------------- verification


def test_a_corrupted_file_is_detected_and_fetched_again(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    # Same size, one byte flipped, and the kit's own record of verified files gone: the situation of a
    # folder made by another tool, where only a full hash can tell.
    shard = dest / SHARD2
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (dest / ".cache" / "internlm-kit" / "verified.json").unlink()
    hub.reset_counters()

    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert proc.returncode == 0, proc.stderr
    assert f"{SHARD2} does not match" in proc.stderr
    assert dict(hub.served) == {SHARD2: hub_repo.files[SHARD2].size}
    assert_same_files(dest, hub_repo)


def test_a_file_changed_after_verification_is_checked_again(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    with open(dest / "config.json", "r+b") as f:  # same size, different bytes
        first = f.read(1)
        f.seek(0)
        f.write(b"[" if first != b"[" else b"{")
    hub.reset_counters()

    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert proc.returncode == 0, proc.stderr
    assert dict(hub.served) == {"config.json": hub_repo.files["config.json"].size}
    assert_same_files(dest, hub_repo)


def test_recheck_finds_damage_that_left_size_mtime_and_inode_alone(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    shard = dest / SHARD2
    st = shard.stat()
    with open(shard, "r+b") as f:  # bit rot: same inode, same size, mtime put back
        f.seek(1000)
        f.write(b"\0" * 16)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    hub.reset_counters()

    trusting = run_kit(["--source", "hf", "--local-dir", str(dest)], env)
    rechecked = run_kit(["--source", "hf", "--local-dir", str(dest), "--recheck"], env)

    assert trusting.returncode == 0 and rechecked.returncode == 0, rechecked.stderr
    assert f"{SHARD2} does not match" in rechecked.stderr
    assert dict(hub.served) == {SHARD2: hub_repo.files[SHARD2].size}
    assert_same_files(dest, hub_repo)


def test_a_server_sending_wrong_bytes_is_refused_after_one_refetch(hub_model_folder, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for p in hub_model_folder.iterdir():
        (served / p.name).write_bytes(p.read_bytes())
    repo = HubRepo.from_folder(HUB_REPO_ID, served)
    (served / "tokenizer.model").write_bytes(b"\0" * repo.files["tokenizer.model"].size)  # metadata now lies
    with HubServer(repo) as hub:
        proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m")], kit_env(hub.url, tmp_path))
        assert hub.served["tokenizer.model"] == 2 * repo.files["tokenizer.model"].size

    assert_clear_failure(proc, "tokenizer.model", "does not match")
    assert not (tmp_path / "m" / "tokenizer.model").exists()


# ---------------------------------------------------------------- failures


def test_unknown_repo_is_a_clear_404(hub, tmp_path):
    proc = run_kit(["internlm/no-such-model", "--source", "hf", "--local-dir", str(tmp_path / "m")],
                   kit_env(hub.url, tmp_path))
    assert_clear_failure(proc, "no repository internlm/no-such-model", "404")


def test_unknown_revision_is_a_clear_failure(hub, tmp_path):
    proc = run_kit(["--source", "hf", "--revision", "v9.9", "--local-dir", str(tmp_path / "m")],
                   kit_env(hub.url, tmp_path))
    assert_clear_failure(proc, "no revision 'v9.9'")


def test_hub_answering_404_for_a_file_is_a_clear_failure(hub, tmp_path):
    hub.fail(404, match="*/resolve/*/tokenizer.model")
    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m")], kit_env(hub.url, tmp_path))
    assert_clear_failure(proc, "404")


def test_hub_answering_500_is_a_clear_failure_suggesting_alternatives(hub, tmp_path):
    hub.fail(500)
    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m")], kit_env(hub.url, tmp_path))
    assert_clear_failure(proc, "HTTP 500", "hf-mirror.com", "--source modelscope", "--from")


def test_a_hanging_hub_times_out_with_a_clear_failure(hub, tmp_path):
    hub.hang()
    started = time.monotonic()
    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m")],
                   kit_env(hub.url, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="2"))
    assert_clear_failure(proc, "Timeout")
    assert time.monotonic() - started < 30


def test_not_enough_disk_space_refuses_before_fetching(hub, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 5 * MiB, 5 * MiB))
    dest = tmp_path / "m"

    with pytest.raises(KitError) as err:
        download(DownloadRequest(source="hf", endpoint=hub.url, local_dir=dest, progress=False))

    assert "not enough disk space" in err.value.message and "--local-dir" in err.value.fix
    assert resolve_gets(hub) == []
    assert not dest.exists() or not any(dest.rglob("*.safetensors"))


def test_bad_arguments_exit_2(tmp_path):
    env = kit_env("http://127.0.0.1:9", tmp_path)
    for args in (["--source", "ftp"], ["not-a-repo-id"], ["--source", "hf", "--from", str(tmp_path)]):
        proc = run_kit(args, env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "fix:" in proc.stderr


def test_offline_mode_checks_an_earlier_download_without_the_network(hub, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest)], env).returncode == 0
    hub.reset_counters()

    ok = run_kit(["--source", "hf", "--local-dir", str(dest)], dict(env, HF_HUB_OFFLINE="1"))
    missing = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "empty")], dict(env, HF_HUB_OFFLINE="1"))

    assert ok.returncode == 0, ok.stderr
    assert hub.requests == []
    assert_clear_failure(missing, "HF_HUB_OFFLINE")


def test_ctrl_c_keeps_the_partial_file_and_exits_130(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="60")  # the pause must not look like a dead link
    sha = hub_repo.files[SHARD1].sha256
    fault = hub.pause(SHARD1, after=11 * MiB)
    proc = popen_kit(["--source", "hf", "--local-dir", str(dest)], env)
    try:
        assert fault.reached.wait(30)
        deadline = time.monotonic() + 20
        while partial_size(dest, sha) < 11 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        try:  # give the kit time to take the signal before bytes flow again (bounded, not a fixed race)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        hub.release()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    before, after = err.split("interrupted: what arrived", 1)
    assert "download ━" in before and "━" not in after  # said below the last progress bar, not above it
    assert partial_size(dest, sha) >= 11 * MiB
    assert not (dest / SHARD1).exists()


@pytest.mark.parametrize("where", ["--endpoint", "HF_ENDPOINT"])
@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:abc", "localhost:8080"])
def test_a_malformed_endpoint_is_one_paragraph_not_a_traceback(tmp_path, where, url):
    env = kit_env(url if where == "HF_ENDPOINT" else "http://127.0.0.1:9", tmp_path)
    args = ["--local-dir", str(tmp_path / "m"), *(["--endpoint", url] if where == "--endpoint" else [])]

    proc = run_kit(args, env)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("internlm-kit: error:") == 1, proc.stderr
    assert f"{where}{' ' if where == '--endpoint' else '='}{url!r} is not a URL" in proc.stderr
    assert "fix:" in proc.stderr and "https://hf-mirror.com" in proc.stderr
    assert not (tmp_path / "m").exists()
