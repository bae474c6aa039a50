"""`internlm-kit install` for real: throwaway venvs, small real packages from the package index,
profiles written by each test. Every test here installs or resolves from the index (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.venvs import make_venv, pip_install
from packaging.requirements import Requirement
from test_install import kit, write_profile

from setup_kit.install.plan import index_problem
from setup_kit.install.pythons import find_pythons
from setup_kit.profiles import load_profile

pytestmark = pytest.mark.slow


def freeze(python: Path) -> bytes:
    """The venv's package set exactly as `pip freeze --all` prints it."""
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "freeze", "--all"],
                          capture_output=True, check=True, timeout=120).stdout


def snapshots(state: Path) -> list[Path]:
    return sorted((state / "snapshots").glob("*.json")) if (state / "snapshots").exists() else []


@pytest.fixture
def venv_with(tmp_path):
    """A fresh venv with these requirements installed from the index."""
    def build(*requirements: str) -> Path:
        python = make_venv(tmp_path / "venv")
        pip_install(python, *requirements)
        return python
    return build


def test_a_profile_that_cannot_resolve_is_refused_and_nothing_changes(tmp_path, venv_with):
    python = venv_with("six==1.15.0", "idna==3.6")
    before = freeze(python)
    # requests 2.31.0 needs urllib3>=1.21.1: no set of versions satisfies both pins.
    profile = write_profile(tmp_path, "impossible", {"requests": "2.31.0", "urllib3": "1.20", "six": "1.16.0"})
    result = kit("--profile", str(profile), "--python", str(python), "--yes", state=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot be installed" in result.stderr and "Nothing was" in result.stderr
    assert "urllib3" in result.stderr and "Traceback" not in result.stderr
    assert freeze(python) == before
    assert snapshots(tmp_path) == []


def test_install_then_rollback_restores_the_exact_previous_set(tmp_path, venv_with):
    python = venv_with("idna==3.6", "packaging==23.2")
    before = freeze(python)
    profile = write_profile(tmp_path, "small", {"six": "1.16.0", "idna": "3.7", "packaging": "24.0"})

    result = kit("--profile", str(profile), "--python", str(python), "--yes", "--json", "-v", state=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Successfully installed" in result.stderr  # pip's own output under -v (stderr, beside --json)
    outcome = json.loads(result.stdout)
    changes = {c["name"]: (c["kind"], c["old"], c["new"]) for c in outcome["resolution"]["changes"]}
    assert changes == {"six": ("install", None, "1.16.0"), "idna": ("upgrade", "3.6", "3.7"),
                       "packaging": ("upgrade", "23.2", "24.0")}
    assert outcome["verification"]["ok"] is True and outcome["snapshot"]
    after = freeze(python).decode()
    assert "six==1.16.0" in after and "idna==3.7" in after

    undo = kit("--rollback", "--python", str(python), "--yes", state=tmp_path)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert "- six" in undo.stdout
    assert freeze(python) == before  # six removed, idna and packaging back, byte for byte


def test_list_snapshots_then_rollback_to_a_named_one_skips_the_later_installs(tmp_path, venv_with):
    """The README's `--list-snapshots` and `--rollback ID`: two installs, back past both to the first."""
    python = venv_with("idna==3.6")
    before = freeze(python)
    first = write_profile(tmp_path, "first", {"idna": "3.7"})
    second = write_profile(tmp_path, "second", {"idna": "3.7", "six": "1.16.0"})
    ids = []
    for profile in (first, second):
        result = kit("--profile", str(profile), "--python", str(python), "--yes", "--json", state=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        ids.append(json.loads(result.stdout)["snapshot"])

    listed = kit("--list-snapshots", "--python", str(python), state=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ids  # oldest first, each with its id
    as_json = json.loads(kit("--list-snapshots", "--json", "--python", str(python), state=tmp_path).stdout)
    assert [s["id"] for s in as_json] == ids

    undo = kit("--rollback", ids[0], "--python", str(python), "--yes", state=tmp_path)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert freeze(python) == before  # idna 3.6 again and no six: both installs undone

    unknown = kit("--rollback", "no-such-snapshot", "--python", str(python), "--yes", state=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert ids[0] in unknown.stderr + unknown.stdout  # it names the snapshots there are


def test_an_install_that_breaks_an_installed_package_is_caught_by_the_check_after(tmp_path, venv_with):
    python = venv_with("requests==2.31.0")  # requires idna>=2.5,<4
    before = freeze(python)
    profile = write_profile(tmp_path, "breaks-requests", {"idna": "2.4", "six": "1.16.0"})

    result = kit("--profile", str(profile), "--python", str(python), "--yes", state=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    # Foreseen in the plan, then caught by the doctor's dependency check with a fix and the way back.
    assert "conflict: requests 2.31.0 requires idna" in out
    assert "requests 2.31.0 requires idna" in out and "fix:" in out
    assert "install --rollback" in out
    assert "idna==2.4" in freeze(python).decode()

    undo = kit("--rollback", "--python", str(python), "--yes", state=tmp_path)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert freeze(python) == before


def test_venv_is_created_with_a_python_the_profile_accepts(tmp_path):
    accepted = sorted({p.version for p in find_pythons()})
    profile = write_profile(tmp_path, "in-venv", {"six": "1.16.0"}, python=">=3.10")
    result = kit("--profile", str(profile), "--venv", str(tmp_path / "env"), "--yes", state=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    python = tmp_path / "env" / "bin" / "python"
    version = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version in accepted and tuple(map(int, version.split(".")[:2])) >= (3, 10)
    assert "six==1.16.0" in freeze(python).decode()


@pytest.fixture(scope="session")
def fresh_311(tmp_path_factory) -> Path:
    """A fresh Python 3.11 venv as a user makes one (`python3.11 -m venv`, with its bundled pip)."""
    candidates = [p for p in find_pythons() if p.version.startswith("3.11.")]
    if not candidates:
        pytest.skip("no Python 3.11 on this machine")
    folder = tmp_path_factory.mktemp("fresh-311") / "venv"
    subprocess.run([candidates[0].path, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=300)
    return folder / "bin" / "python"


def dry_run(profile: str, python: Path, state: Path) -> dict:
    before = freeze(python)
    result = kit("--profile", profile, "--python", str(python), "--dry-run", "--json", state=state, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert freeze(python) == before, "a dry run must not change the environment"
    assert snapshots(state) == []
    return json.loads(result.stdout)


def test_dry_run_resolves_the_tutorial_profile_for_a_fresh_python_311(fresh_311, tmp_path):
    outcome = dry_run("tutorial", fresh_311, tmp_path)
    new = {c["name"].lower(): c for c in outcome["resolution"]["changes"]}
    assert new["torch"]["new"] == "2.1.2"
    assert new["transformers"]["new"].startswith("4.38.")
    assert {"protobuf", "accelerate", "sentencepiece", "einops"} <= set(new)
    hub = new["huggingface-hub"]["new"]
    for requirement in map(Requirement, new["tokenizers"]["requires"]):
        if requirement.name == "huggingface-hub" and not requirement.marker:
            assert requirement.specifier.contains(hub), f"tokenizers wants {requirement}, plan has {hub}"
    assert outcome["resolution"]["conflicts"] == []
    assert outcome["commands"][0].endswith("torch==2.1.2 torchvision==0.16.2 torchaudio==2.1.2")


@pytest.mark.parametrize("name", ["cpu", "current"])
def test_dry_run_resolves_the_other_profiles_for_this_machines_python(fresh_311, tmp_path, name):
    profile = load_profile(name)
    if profile.cuda and index_problem(profile.torch_index_url):
        # Its CUDA torch comes only from download.pytorch.org: the dry run refuses as the install does.
        result = kit("--profile", name, "--python", str(fresh_311), "--dry-run", state=tmp_path, timeout=600)
        assert result.returncode == 1 and "cannot be reached" in result.stderr, result.stdout + result.stderr
        return
    outcome = dry_run(name, fresh_311, tmp_path)
    new = {c["name"].lower(): c["new"] for c in outcome["resolution"]["changes"]}
    assert new["torch"].split("+")[0] == profile.pin("torch").version
    assert new["transformers"] == profile.pin("transformers").version
    if index_problem(profile.torch_index_url):
        # download.pytorch.org cannot be reached from some machines: said, and PyPI used instead.
        assert any("cannot be reached" in note for note in outcome["notes"])


def test_installer_uv_is_used_when_present_and_rollback_still_restores(tmp_path, venv_with):
    from setup_kit.install.plan import find_uv

    if find_uv() is None:
        pytest.skip("uv is not installed (it comes with the test extra)")
    python = venv_with("idna==3.6")
    before = freeze(python)
    profile = write_profile(tmp_path, "with-uv", {"six": "1.16.0", "idna": "3.7"})
    result = kit("--profile", str(profile), "--python", str(python), "--installer", "uv", "--yes", "--json",
                 state=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout)
    assert all(" pip install --python " in c and "/uv " in c.split(" pip ")[0] + " " for c in outcome["commands"])
    changes = {c["name"]: (c["kind"], c["new"]) for c in outcome["resolution"]["changes"]}
    assert changes == {"six": ("install", "1.16.0"), "idna": ("upgrade", "3.7")}
    assert "six==1.16.0" in freeze(python).decode()
    assert kit("--rollback", "--python", str(python), "--yes", state=tmp_path).returncode == 0
    assert freeze(python) == before


def test_at_a_terminal_it_asks_first_and_no_means_nothing_changes(tmp_path, venv_with):
    import os

    import pexpect

    python = venv_with("idna==3.6")
    before = freeze(python)
    profile = write_profile(tmp_path, "asked", {"idna": "3.7"})
    env = dict(os.environ, INTERNLM_KIT_STATE_DIR=str(tmp_path), COLUMNS="200")
    child = pexpect.spawn(sys.executable, ["-m", "setup_kit", "install", "--profile", str(profile),
                                           "--python", str(python)], env=env, encoding="utf-8", timeout=180)
    child.expect(r"↑ idna 3\.6 -> 3\.7")
    child.expect(r"Install profile asked into .*\? \[y/N\]")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "nothing was changed" in child.before
    assert freeze(python) == before and snapshots(tmp_path) == []


# An sdist whose metadata can be prepared (so the profile resolves) but whose build always fails: the
# install's second step fails after the first (torch's group) has already changed the venv.
BROKEN_BACKEND = '''
import pathlib

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = pathlib.Path(metadata_directory) / "brokenbuild-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: brokenbuild\\nVersion: 1.0\\n")
    return info.name

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("brokenbuild cannot be built (a test fixture)")
'''


def broken_sdist(folder: Path) -> Path:
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": BROKEN_BACKEND,
        "PKG-INFO": "Metadata-Version: 2.1\nName: brokenbuild\nVersion: 1.0\n",
    }
    with tarfile.open(folder / "brokenbuild-1.0.tar.gz", "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"brokenbuild-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def test_a_step_that_fails_after_another_changed_the_venv_is_undone_at_once(tmp_path, venv_with, monkeypatch):
    python = venv_with("idna==3.6")
    before = freeze(python)
    monkeypatch.setenv("PIP_FIND_LINKS", str(broken_sdist(tmp_path / "links")))
    profile = tmp_path / "half.toml"
    profile.write_text('name = "half"\nsummary = "fails halfway"\npython = ">=3.8"\ncuda = ""\n\n'
                       '[torch_source]\nindex_url = ""\nwhy = "test"\n\n'
                       '[[pin]]\nname = "six"\nversion = "1.16.0"\nwhy = "installs first"\ngroup = "torch"\n\n'
                       '[[pin]]\nname = "idna"\nversion = "3.7"\nwhy = "an upgrade"\n\n'
                       '[[pin]]\nname = "brokenbuild"\nversion = "1.0"\nwhy = "fails to build"\n')
    result = kit("--profile", str(profile), "--python", str(python), "--yes", state=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    kit_part, _, error = result.stderr.partition("internlm-kit: error:")
    assert "Traceback" not in kit_part and "failed at" in error and "brokenbuild" in error  # pip's tail follows
    assert "put back exactly as it was" in result.stderr
    assert freeze(python) == before  # six (installed by the first step) is gone again
