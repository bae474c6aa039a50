"""`internlm-kit doctor --fix`: real throwaway venvs with real old packages, repaired in one plan.

Each test builds its own venv (a fix changes it; cached venvs are never changed), runs the CLI as a
user would, and then proves the broken thing runs and the doctor is clean.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.venvs import make_venv, pip_install

pytestmark = pytest.mark.slow


def kit(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "setup_kit", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def freeze(python: Path) -> str:
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "freeze", "--all"],
                          capture_output=True, text=True, check=True, timeout=120).stdout


def version(python: Path, name: str) -> str:
    return subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({name!r}))"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@pytest.fixture
def state(tmp_path, monkeypatch) -> dict:
    """The kit's snapshots and logs go under the test's folder."""
    monkeypatch.setenv("INTERNLM_KIT_STATE_DIR", str(tmp_path / "state"))
    return dict(os.environ)


@pytest.fixture
def tokenizers_conflict(tmp_path) -> Path:
    """tokenizers 0.14.1, then huggingface-hub 0.24.2 over it (pip allows it with a warning)."""
    python = make_venv(tmp_path / "venv")
    pip_install(python, "tokenizers==0.14.1")
    pip_install(python, "huggingface-hub==0.24.2")
    return python


def test_fix_yes_repairs_a_dependency_conflict_in_one_resolution_and_the_doctor_is_clean(tokenizers_conflict,
                                                                                         state):
    python = tokenizers_conflict
    done = kit("doctor", "--fix", "--yes", "--python", str(python), "--only", "packages.dependencies", env=state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "huggingface-hub 0.24.2 -> 0.17.3" in done.stdout  # the plan, shown before applying
    assert "Fixed: the doctor is clean" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert version(python, "huggingface-hub") == "0.17.3"
    # the broken thing runs: tokenizers' hub integration imports
    subprocess.run([str(python), "-c", "import tokenizers, huggingface_hub; from huggingface_hub import hf_hub_download"],
                   check=True, timeout=60)
    again = kit("doctor", "--python", str(python), "--only", "packages.dependencies", env=state)
    assert again.returncode == 0, again.stdout
    # install's snapshot was taken first, so the user can undo it
    assert list((Path(state["INTERNLM_KIT_STATE_DIR"]) / "snapshots").glob("*doctor-fix*.json"))


def test_fix_dry_run_shows_the_plan_and_changes_nothing(tokenizers_conflict, state):
    before = freeze(tokenizers_conflict)
    done = kit("doctor", "--fix", "--dry-run", "--python", str(tokenizers_conflict), "--only",
               "packages.dependencies", env=state)
    assert done.returncode == 1
    assert "huggingface-hub 0.24.2 -> 0.17.3" in done.stdout and "Dry run: nothing was changed." in done.stdout
    assert freeze(tokenizers_conflict) == before


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_a_fix_that_cannot_be_installed_leaves_the_environment_byte_identical(tokenizers_conflict, state, tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    offline = dict(state, PIP_INDEX_URL=f"http://127.0.0.1:{closed_port()}/simple", PIP_NO_CACHE_DIR="1",
                   PIP_FIND_LINKS=str(empty), PIP_EXTRA_INDEX_URL="")
    before = freeze(tokenizers_conflict)
    done = kit("doctor", "--fix", "--yes", "--python", str(tokenizers_conflict), "--only", "packages.dependencies",
               env=offline)
    assert done.returncode == 1, done.stdout + done.stderr
    assert freeze(tokenizers_conflict) == before
    assert "Traceback" not in done.stdout + done.stderr
    error = done.stderr.strip()
    assert "The fix cannot be installed" in error and "Nothing was changed" in error and "\n\n" not in error


@pytest.fixture
def accelerate_too_new(tmp_path) -> Path:
    """transformers 4.34.0's stack with a plain `pip install accelerate` of its day (0.32.1): pip check is
    clean, but accelerate imports split_torch_state_dict_into_shards, which huggingface-hub 0.17.3 lacks."""
    python = make_venv(tmp_path / "venv")
    pip_install(python, "torch==2.13.0", "transformers==4.34.0", "tokenizers==0.14.1", "huggingface-hub==0.17.3",
                "accelerate==0.32.1")
    broken = subprocess.run([str(python), "-c", "import transformers.modeling_utils"], capture_output=True,
                            text=True, timeout=300)
    assert "split_torch_state_dict_into_shards" in broken.stderr  # the real failure, reproduced
    return python


def test_fix_finds_and_proves_an_accelerate_that_imports_and_keeps_torch(accelerate_too_new, state):
    python = accelerate_too_new
    done = kit("doctor", "--fix", "--yes", "--python", str(python), "--only", "packages.dependencies", env=state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accelerate 0.32.1 ->" in done.stdout
    from packaging.version import Version

    assert Version(version(python, "accelerate")) < Version("0.32.1")
    assert version(python, "torch").startswith("2.13.0")  # kept
    assert version(python, "huggingface-hub") == "0.17.3"
    subprocess.run([str(python), "-c", "import accelerate, transformers.modeling_utils; "
                                       "from transformers import AutoModelForCausalLM"], check=True, timeout=300)


@pytest.fixture
def missing_protobuf_and_accelerate(tmp_path) -> Path:
    python = make_venv(tmp_path / "venv")
    pip_install(python, "torch==2.13.0", "transformers==4.38.2", "sentencepiece")
    return python


def test_fix_installs_the_missing_packages_together_and_keeps_torch(missing_protobuf_and_accelerate, state):
    python = missing_protobuf_and_accelerate
    done = kit("doctor", "--fix", "--yes", "--python", str(python), "--only", "packages.required", env=state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "+ protobuf" in done.stdout and "+ accelerate" in done.stdout
    assert version(python, "torch").startswith("2.13.0")
    subprocess.run([str(python), "-c", "import google.protobuf, accelerate, einops, transformers.modeling_utils"],
                   check=True, timeout=300)
    assert kit("doctor", "--python", str(python), "--only", "packages.required", env=state).returncode == 0


def write_wheel(folder: Path, name: str, version: str, requires: list[str], init: str) -> Path:
    """A real wheel file (zip, METADATA, WHEEL, RECORD) of a one-module package."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": init,
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_a_fix_after_which_the_packages_still_do_not_import_is_undone(tmp_path, state):
    """The only einops that satisfies the requirement installs but cannot be imported: the fix is applied,
    proved wrong by importing, and the environment is put back exactly (pip freeze --all identical)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "needs_einops", "1.0", ["einops>=99"], "")
    write_wheel(wheels, "einops", "99.0", [], "raise ImportError('this einops is broken')\n")
    python = make_venv(tmp_path / "venv")
    pip_install(python, "--no-deps", str(wheels / "needs_einops-1.0-py3-none-any.whl"))
    before = freeze(python)
    local = dict(state, PIP_FIND_LINKS=str(wheels), PIP_NO_INDEX="1")
    done = kit("doctor", "--fix", "--yes", "--python", str(python), "--only", "packages.dependencies", env=local)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "+ einops 99.0" in done.stdout  # it was tried
    assert "still fails (import einops)" in done.stdout and "put back exactly as it was" in done.stdout
    assert freeze(python) == before
    assert "Traceback" not in done.stdout + done.stderr


def test_a_truncated_shard_is_repaired_through_download_with_the_folders_own_repo(hub, hub_repo, tmp_path, state):
    env = dict(state, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), INTERNLM_KIT_MODELS=str(tmp_path / "m"),
               INTERNLM_KIT_SHARE_ROOTS="", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    folder = tmp_path / "weights"  # a name that says nothing: the repo comes from the download record
    got = kit("download", hub_repo.repo_id if hasattr(hub_repo, "repo_id") else "internlm/internlm2-chat-1_8b",
              "--source", "hf", "--local-dir", str(folder), env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    shard = folder / "model-00001-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    done = kit("doctor", "--fix", "--yes", "--model", str(folder), "--only", "model.weights", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"internlm-kit download internlm/internlm2-chat-1_8b --local-dir {folder}" in done.stdout
    assert shard.read_bytes() == whole
    assert kit("doctor", "--model", str(folder), "--only", "model.weights", env=env).returncode == 0
