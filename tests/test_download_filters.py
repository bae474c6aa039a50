"""`internlm-kit download --include/--exclude/--token`, with `hf download`'s meaning: exclude globs drop
files after include globs chose them, on every source; a token reaches the hub as a bearer token and
is never shown. The hub is the loopback one of tests/fixtures/hub.py: what it served and the
Authorization header of every request are recorded there."""

from __future__ import annotations

import json
import shutil

import pytest

from test_download import assert_clear_failure, kit_env, resolve_gets, run_kit

SHARDS = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
INDEX = "model.safetensors.index.json"
TOKEN = "hf_kitTestTokenThatMustNeverBePrinted0123"
NO_HUB = "http://127.0.0.1:9"  # nothing listens there


def fetched(hub) -> set[str]:
    """The files whose bytes the hub sent."""
    return {path for path, n in hub.served.items() if n > 0}


def dry_run_listing(stdout: str) -> set[str]:
    """The paths of the `ACTION SIZE PATH` lines --dry-run prints."""
    rows = [line.split() for line in stdout.splitlines()]
    return {row[2] for row in rows if len(row) == 3 and row[0] in ("fetch", "resume", "check", "verified",
                                                                   "link", "copy", "present")}


def files_in(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


# ---------------------------------------------------------------- the hub


def test_exclude_leaves_the_shards_on_the_hub_and_the_index_still_verifies(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--exclude", "*.safetensors", "--json"],
                   kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    wanted = set(hub_repo.files) - SHARDS
    assert INDEX in wanted  # the index names both shards, which were left out on purpose
    assert fetched(hub) == wanted
    assert all(hub.served[p] == hub_repo.files[p].size for p in wanted)
    assert files_in(dest) == wanted
    result = json.loads(proc.stdout)
    assert result["verified"] is True
    assert {f["path"] for f in result["files"]} == wanted
    assert result["bytes"] == sum(hub_repo.files[p].size for p in wanted)


def test_exclude_applies_after_include_and_repeats(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--include", "*.json", "--include", "*.model",
                    "--exclude", INDEX, "--exclude", "tokenizer*"], kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    wanted = {p for p in hub_repo.files if p.endswith(".json") and p != INDEX and not p.startswith("tokenizer")}
    assert wanted and "config.json" in wanted and "tokenizer_config.json" not in wanted
    assert fetched(hub) == wanted
    assert files_in(dest) == wanted


def test_dry_run_lists_only_the_selection_and_fetches_nothing(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--exclude", "*.safetensors", "--dry-run"],
                   kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert dry_run_listing(proc.stdout) == set(hub_repo.files) - SHARDS
    total = sum(f.size for p, f in hub_repo.files.items() if p not in SHARDS)
    assert f"total {total:,} bytes" in proc.stdout
    assert resolve_gets(hub) == [] and not dest.exists()


def test_an_exclude_that_leaves_nothing_is_a_clear_failure(hub, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--include", "*.json", "--exclude", "*"],
                   kit_env(hub.url, tmp_path))

    assert_clear_failure(proc, "--exclude *", "leaves none", "config.json")
    assert resolve_gets(hub) == [] and not dest.exists()


def test_a_full_run_after_an_excluding_one_fetches_only_what_was_left_out(hub, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(hub.url, tmp_path)
    assert run_kit(["--source", "hf", "--local-dir", str(dest), "--exclude", "*.safetensors"], env).returncode == 0
    hub.reset_counters()

    proc = run_kit(["--source", "hf", "--local-dir", str(dest)], env)

    assert proc.returncode == 0, proc.stderr
    assert fetched(hub) == SHARDS
    assert files_in(dest) == set(hub_repo.files)


# ---------------------------------------------------------------- a local copy


def test_local_exclude_places_the_rest_and_passes_the_selection_aware_checks(hub_model_folder, hub_repo, tmp_path):
    dest = tmp_path / "m"
    proc = run_kit(["--source", "local", "--from", str(hub_model_folder), "--local-dir", str(dest),
                    "--exclude", "model-00002-*", "--json"], kit_env(NO_HUB, tmp_path))

    assert proc.returncode == 0, proc.stderr
    wanted = set(hub_repo.files) - {"model-00002-of-00002.safetensors"}
    assert files_in(dest) == wanted  # the index names the shard left out on purpose: not a failure
    result = json.loads(proc.stdout)
    assert result["verified"] is True and {f["path"] for f in result["files"]} == wanted


def test_local_exclude_still_checks_the_shards_it_places(hub_model_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hub_model_folder, broken)
    with open(broken / "model-00001-of-00002.safetensors", "r+b") as f:
        f.truncate(1_000_000)

    proc = run_kit(["--source", "local", "--from", str(broken), "--local-dir", str(tmp_path / "m"),
                    "--exclude", "model-00002-*"], kit_env(NO_HUB, tmp_path))

    assert_clear_failure(proc, "model-00001-of-00002.safetensors", "truncated")


def test_local_dry_run_and_an_empty_selection(hub_model_folder, hub_repo, tmp_path):
    dest = tmp_path / "m"
    env = kit_env(NO_HUB, tmp_path)
    dry = run_kit(["--source", "local", "--from", str(hub_model_folder), "--local-dir", str(dest),
                   "--exclude", "*.safetensors", "--dry-run"], env)

    assert dry.returncode == 0, dry.stderr
    assert dry_run_listing(dry.stdout) == set(hub_repo.files) - SHARDS and not dest.exists()

    empty = run_kit(["--source", "local", "--from", str(hub_model_folder), "--local-dir", str(dest),
                     "--exclude", "*"], env)

    assert_clear_failure(empty, "--exclude *", "leaves none")
    assert not dest.exists()


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize("file_metadata", [True, False], ids=["listing", "mirror-without-metadata"])
def test_token_reaches_every_hub_request_as_a_bearer_token_and_is_never_printed(hub, hub_repo, tmp_path,
                                                                                file_metadata):
    hub.file_metadata = file_metadata  # False: sizes and hashes come from a HEAD per file, which needs it too
    dest = tmp_path / "m"
    proc = run_kit(["--source", "hf", "--local-dir", str(dest), "--token", TOKEN, "--json"],
                   kit_env(hub.url, tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert fetched(hub) == set(hub_repo.files)
    assert hub.authorization and {auth for _, auth in hub.authorization} == {f"Bearer {TOKEN}"}
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr


def test_hf_token_from_the_environment_still_works_and_the_option_wins(hub, tmp_path):
    env = kit_env(hub.url, tmp_path, HF_TOKEN="hf_fromTheEnvironment")
    assert run_kit(["--source", "hf", "--local-dir", str(tmp_path / "a"), "--include", "*.json"], env).returncode == 0
    assert {auth for _, auth in hub.authorization} == {"Bearer hf_fromTheEnvironment"}
    hub.reset_counters()

    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "b"), "--include", "*.json", "--token", TOKEN], env)

    assert proc.returncode == 0, proc.stderr
    assert {auth for _, auth in hub.authorization} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize("status, where", [(401, "/api/*"), (403, "*/resolve/*/config.json"), (500, "*")])
def test_a_refused_or_failing_hub_never_echoes_the_token(hub, tmp_path, status, where):
    hub.fail(status, match=where)
    proc = run_kit(["--source", "hf", "--local-dir", str(tmp_path / "m"), "--token", TOKEN, "--json"],
                   kit_env(hub.url, tmp_path))

    assert_clear_failure(proc)
    assert any(auth == f"Bearer {TOKEN}" for _, auth in hub.authorization)
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    # A refusal points at access (gated, private, the token); a server error does not.
    assert ("--token" in proc.stderr and "gated" in proc.stderr) == (status in (401, 403)), proc.stderr
