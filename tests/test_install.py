"""`internlm-kit install`: the parts that need no package index (profile data, refusals, choices,
the snapshot arithmetic). The real installs are in test_install_venvs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.venvs import make_venv
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from setup_kit.install.choose import choose_profile
from setup_kit.install.snapshot import Environment, Installed, Snapshot, restore_commands, restore_plan
from setup_kit.install.target import Target
from setup_kit.probe import probe_gpu
from setup_kit.profiles import available_profiles


def kit(*args: str, state: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, stdin not a terminal, the kit's state kept under `state`."""
    env = dict(env or os.environ, INTERNLM_KIT_STATE_DIR=str(state), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "setup_kit", "install", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)


def write_profile(folder: Path, name: str, pins: dict[str, str], python: str = ">=3.8", cuda: str = "",
                  index_url: str = "") -> Path:
    lines = [f'name = "{name}"', f'summary = "test profile {name}"', f'python = "{python}"', f'cuda = "{cuda}"',
             "", "[torch_source]", f'index_url = "{index_url}"', 'why = "test"', ""]
    for package, version in pins.items():
        lines += ["[[pin]]", f'name = "{package}"', f'version = "{version}"', 'why = "test pin"', ""]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_every_shipped_profile_is_listed_with_its_torch_and_transformers(tmp_path):
    result = kit("--list-profiles", "--json", state=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"tutorial", "current", "cpu"} <= set(rows)
    assert rows["tutorial"]["torch"] == "2.1.2" and rows["tutorial"]["transformers"].startswith("4.38.")
    assert rows["cpu"]["cuda"] == "cpu"
    human = kit("--list-profiles", state=tmp_path)
    assert human.returncode == 0 and "tutorial" in human.stdout and "2.1.2" in human.stdout
    reasons = kit("--list-profiles", "-v", state=tmp_path)
    tutorial = available_profiles()["tutorial"]
    for pin in tutorial.pins:  # every pin with the reason its profile gives
        assert f"{pin.name}=={pin.version}: {pin.why.split()[0]}" in reasons.stdout, pin.name


def test_every_pin_says_why_and_torch_comes_first():
    for profile in available_profiles().values():
        assert profile.pin("torch") is not None and profile.pin("torch").group == "torch", profile.name
        for pin in profile.pins:
            assert pin.why.strip(), f"{profile.name}: {pin.name} has no 'why'"
            Version(pin.version)  # a real version, not a range
        SpecifierSet(profile.python)


def test_without_a_terminal_and_without_yes_it_refuses_before_doing_anything(tmp_path):
    result = kit("--profile", "cpu", state=tmp_path)
    assert result.returncode == 2
    assert "--yes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "snapshots").exists()


def test_a_python_the_profile_rejects_is_refused_naming_the_python_it_needs(tmp_path):
    profile = write_profile(tmp_path, "ancient", {"six": "1.16.0"}, python="<3.0")
    result = kit("--profile", str(profile), "--python", sys.executable, "--yes", state=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "needs Python <3.0" in result.stderr and "--venv" in result.stderr
    assert not (tmp_path / "snapshots").exists()


def test_venv_without_an_accepted_python_is_refused_naming_it(tmp_path):
    profile = write_profile(tmp_path, "future", {"six": "1.16.0"}, python=">=3.99")
    result = kit("--profile", str(profile), "--venv", str(tmp_path / "env"), "--yes", state=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "No Python >=3.99" in result.stderr and "found:" in result.stderr
    assert not (tmp_path / "env").exists()


def test_rollback_without_any_snapshot_says_so(tmp_path):
    result = kit("--rollback", "--python", sys.executable, "--yes", state=tmp_path)
    assert result.returncode == 1
    assert "no snapshot" in result.stderr and "Traceback" not in result.stderr
    # Without --yes too: there is nothing to consent to, so the missing snapshot is what it says.
    result = kit("--rollback", "--python", sys.executable, state=tmp_path)
    assert result.returncode == 1 and "no snapshot" in result.stderr and "--yes" not in result.stderr


def test_an_unreachable_torch_source_stops_a_cuda_install_before_anything_changes(tmp_path):
    python = make_venv(tmp_path / "venv")
    # Port 9 (discard) on loopback: refused at once, like a blocked download.pytorch.org.
    profile = write_profile(tmp_path, "cuda-only", {"six": "1.16.0"}, cuda="12.1", index_url="http://127.0.0.1:9/whl")
    result = kit("--profile", str(profile), "--python", str(python), "--yes", state=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "http://127.0.0.1:9/whl cannot be reached" in result.stderr and "--torch-index-url" in result.stderr
    assert not (tmp_path / "snapshots").exists()
    # The dry run says what the real run does: the same refusal, the same exit code.
    dry = kit("--profile", str(profile), "--python", str(python), "--dry-run", state=tmp_path)
    assert dry.returncode == result.returncode, dry.stdout + dry.stderr
    assert "http://127.0.0.1:9/whl cannot be reached" in dry.stderr and "Traceback" not in dry.stderr


def test_a_dry_run_gives_the_size_of_what_the_install_downloads(tmp_path):
    import json

    python = make_venv(tmp_path / "venv")
    profile = write_profile(tmp_path, "small", {"six": "1.16.0", "idna": "3.6"})
    result = kit("--profile", str(profile), "--python", str(python), "--dry-run", "--json", state=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(fetched), "six==1.16.0", "idna==3.6"], check=True, capture_output=True, timeout=300)
    real = sum(f.stat().st_size for f in fetched.iterdir())
    assert json.loads(result.stdout)["resolution"]["download_bytes"] == real
    shown = kit("--profile", str(profile), "--python", str(python), "--dry-run", state=tmp_path)
    assert f"Download: about {real / 1e3:.1f} kB" in shown.stdout, shown.stdout


@pytest.mark.parametrize("machine, expected", [("a100-535", "current"), ("t4", "current"), ("v100-470", "cpu")])
def test_profile_is_chosen_from_the_driver(fake_gpu, machine, expected):
    fake_gpu(machine)
    profile, reason = choose_profile(probe_gpu(), available_profiles())
    assert profile.name == expected
    if expected == "cpu":
        assert "too old" in reason and "470.182.03" in reason
    else:
        assert "530.30.02" in reason  # the CUDA 12.1 build's minimum driver, from envs/cuda.toml


def test_no_gpu_means_the_cpu_profile(no_gpu):
    profile, reason = choose_profile(probe_gpu(), available_profiles())
    assert profile.name == "cpu" and "no NVIDIA GPU" in reason


def test_the_chosen_profile_and_its_reason_are_printed(fake_gpu, tmp_path):
    """A100 on driver 535 -> current; the reason is shown before the Python 3.13 target is refused."""
    py313 = Path("/root/.pyenv/versions/3.13.0/bin/python3")
    if not py313.exists():
        pytest.skip("needs a Python 3.13 interpreter to stand for a target the profile rejects")
    env = fake_gpu("a100-535")
    result = kit("--python", str(py313), "--dry-run", state=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "Profile: current" in result.stdout and "535.129.03" in result.stdout
    assert "needs Python >=3.10,<3.13" in result.stderr


def _env(**versions: str) -> Environment:
    return Environment({k: Installed(k, v, f"{k}=={v}") for k, v in versions.items()})


def test_restore_plan_removes_what_was_added_and_reinstalls_what_moved():
    snapshot = Snapshot("s", "now", "/py", "3.11", "before", [
        {"name": "idna", "version": "3.6", "spec": "idna==3.6", "editable": False},
        {"name": "six", "version": "1.15.0", "spec": "six==1.15.0", "editable": False},
        {"name": "kit", "version": "0.1", "spec": "-e file:///src/kit", "editable": True},
        {"name": "gone", "version": "1.0", "spec": "gone==1.0", "editable": False},
    ])
    now = _env(idna="3.7", six="1.15.0", extra="2.0")
    now.distributions["kit"] = Installed("kit", "0.1", "-e file:///src/kit", True)
    plan = restore_plan(snapshot, now)
    assert plan.remove == ["extra"]
    assert [e["name"] for e in plan.reinstall] == ["gone", "idna"]
    assert plan.unchanged == 2
    commands = restore_commands(Target("/py", "3.11", ("pip",)), plan)
    assert commands == [["pip", "uninstall", "--yes", "extra"], ["pip", "install", "--no-deps", "gone==1.0", "idna==3.6"]]


class RecordingConsole:
    """What `install` shows: printed lines, and each text its progress line was updated to."""

    def __init__(self):
        self.printed, self.status_lines = [], []

    def print(self, *parts, **_):
        self.printed.append(" ".join(map(str, parts)))

    def status(self, text, **_):
        import contextlib

        console = self

        class Status:
            def update(self, text):
                console.status_lines.append(text)

        console.status_lines.append(text)
        return contextlib.nullcontext(Status())


def test_install_steps_show_how_far_a_download_is(tmp_path):
    from setup_kit.install.execute import run_steps

    console = RecordingConsole()
    # A wheel over pip's 512 kB progress threshold, fetched (not from the cache), into a folder.
    argv = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps", "--target",
            str(tmp_path / "site"), "setuptools==69.0.0"]
    [result] = run_steps([argv], console, False, tmp_path / "install.log", "Installing")
    assert result.code == 0, result.output
    progress = [line for line in console.status_lines if " MB (" in line]
    assert progress and progress[-1].endswith("(100%)"), console.status_lines
    assert "setuptools" in progress[-1]
    # The log and the step's output keep pip's words, not thousands of progress lines.
    assert "Progress " not in (tmp_path / "install.log").read_text() and "Progress " not in result.output


def test_list_profiles_fits_an_80_column_terminal_without_wrapped_cells(tmp_path):
    from setup_kit.profiles import load_profile

    result = subprocess.run([sys.executable, "-m", "setup_kit", "install", "--list-profiles"], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, COLUMNS="80", INTERNLM_KIT_STATE_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("cpu", "current", "tutorial"):
        profile = load_profile(name)
        [row] = [line for line in lines if line.split()[:1] == [name]]
        assert profile.pin("torch").version in row and len(row.rstrip()) <= 80  # one line per profile
        assert f"  {name}: {profile.summary}" in lines  # the description whole, on its own line
