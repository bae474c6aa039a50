"""`make setup` picks the environment by the machine: what `make -n` would run, with fake drivers on PATH.

A real `make setup` on a GPU machine downloads gigabytes; `make -n` evaluates the same conditions
(the nvidia-smi probe runs for real) and prints the commands, which is what these tests read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.gpu import MACHINES, write_fake_nvidia_smi

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned(tmp_path: Path, path: str, *args: str, target: str = "setup") -> list[str]:
    """The commands `make <target>` would run for a fresh venv under tmp_path."""
    env = {**os.environ, "PATH": path}
    done = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}", *args],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def path_without_nvidia_smi() -> str:
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "nvidia-smi").exists())


def with_fake_gpu(tmp_path: Path, kind: str) -> str:
    write_fake_nvidia_smi(tmp_path / "bin", MACHINES[kind])
    return os.pathsep.join([str(tmp_path / "bin"), path_without_nvidia_smi()])


def install_lines(lines: list[str]) -> list[str]:
    """The install a fresh venv gets (setup's re-profiling branch for an existing venv is indented)."""
    return [line for line in lines if "internlm-kit install" in line and not line[:1].isspace()]


def test_without_a_gpu_setup_installs_the_dev_stack_and_no_profile(tmp_path):
    lines = planned(tmp_path, path_without_nvidia_smi())
    assert any('pip install "torch==2.13.0"' in line for line in lines)
    assert install_lines(lines) == []
    assert any(line.strip().startswith(f"{tmp_path / 'venv'}/bin/internlm-kit doctor") for line in lines)


def test_on_a_cuda_12_2_machine_the_kit_picks_the_profile_the_driver_runs(tmp_path):
    lines = planned(tmp_path, with_fake_gpu(tmp_path, "a100-535"))
    # No dev torch first (PyPI's is built for a newer CUDA than driver 535 runs): the install chooses.
    assert not any("torch==2.13.0" in line for line in lines)
    [install] = install_lines(lines)
    assert "--profile" not in install and "--yes" in install
    assert install.split()[0] == f"{tmp_path / 'venv'}/bin/internlm-kit"


def test_a_named_profile_wins_and_profile_dev_keeps_the_dev_stack_on_a_gpu_machine(tmp_path):
    path = with_fake_gpu(tmp_path, "a100-535")
    [install] = install_lines(planned(tmp_path, path, "PROFILE=tutorial"))
    assert "--profile tutorial" in install
    lines = planned(tmp_path, path, "PROFILE=dev")
    assert install_lines(lines) == [] and any("torch==2.13.0" in line for line in lines)


@pytest.mark.parametrize("target", ["chat", "serve", "test"])
def test_every_target_that_needs_the_environment_sets_it_up_the_same_way(tmp_path, target):
    # `make chat` from a clean clone on a GPU machine must bring the profile's torch and the chat extra,
    # not only what the stamp's first step installs.
    lines = planned(tmp_path, with_fake_gpu(tmp_path, "a100-535"), target=target)
    [install] = install_lines(lines)
    assert any('-e ".[chat,serve,test]"' in line for line in lines[lines.index(install):])


def test_ci_runs_exactly_the_readme_commands():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-2:] == ["make setup", "make test"]
    assert not any("apt-get" in line for line in commands)


def _browser_tests(env_overrides: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(INTERNLM_KIT_CHROMIUM="/nonexistent/chromium", **env_overrides)
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_serve_page.py", "-x", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_without_chromium_the_browser_tests_are_skipped_with_the_command_that_brings_it():
    done = _browser_tests({})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIPPED" in done.stdout and "Chromium is missing" in done.stdout
    assert "sudo apt-get install -y chromium" in done.stdout and "make setup" in done.stdout
    assert " passed" not in done.stdout


def test_under_ci_the_browser_tests_fail_without_chromium_rather_than_skip():
    done = _browser_tests({"CI": "true"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Chromium is missing" in done.stdout and "SKIPPED" not in done.stdout


def test_setup_installs_chromium_only_without_a_password_prompt(tmp_path):
    lines = planned(tmp_path, path_without_nvidia_smi())
    recipe = "\n".join(lines)
    assert "apt-get install -y chromium" in recipe
    assert "sudo -n" in recipe  # sudo never asks for a password: without it, setup says how and goes on


@pytest.fixture(scope="module")
def endless_model(tiny_internlm2_dir, tmp_path_factory) -> Path:
    """The tiny model whose replies never end on their own, so Ctrl-C lands mid-reply."""
    from fixtures.models import build_tiny_internlm2
    from test_chat_repl import never_end_turn

    folder = build_tiny_internlm2(tmp_path_factory.mktemp("models") / "tiny-endless",
                                  max_position_embeddings=4096,
                                  tokenizer_model=tiny_internlm2_dir / "tokenizer.model")
    never_end_turn(folder)
    return folder


def make_in_a_terminal(target: str, model: Path, state: Path, *variables: str):
    import pexpect

    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state), "NO_COLOR": "1", "TERM": "dumb",
           "COLUMNS": "200"}
    env.pop("MAKEFLAGS", None)
    # -o: the dev venv counts as set up whatever pyproject.toml's time, so make never rebuilds it here.
    venv = Path(sys.executable).parent.parent
    return pexpect.spawn("make", ["-C", str(ROOT), "--no-print-directory", target, f"MODEL={model}",
                                  f"VENV={venv}", "-o", f"{venv}/.installed", *variables],
                         env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))


def test_make_chat_ends_as_the_kit_ends_after_ctrl_c_and_exit(endless_model, tmp_path):
    child = make_in_a_terminal("chat", endless_model, tmp_path / "state")
    child.expect_exact(">>> ")
    child.sendline("tell me a very long story")
    child.expect_exact("tell me a very long story\r\n")
    child.expect(r"\S")  # the reply streams
    child.sendintr()
    child.expect_exact("reply stopped", timeout=30)
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect_eof(), timeout=60)
    child.close()
    shown = child.before
    assert child.exitstatus == 0, shown
    assert "make:" not in shown and "Interrupt" not in shown and "Error" not in shown


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_make_serve_ends_as_the_kit_ends_after_ctrl_c(tiny_internlm2_dir, tmp_path):
    from fixtures.servers import free_port

    port = free_port()
    child = make_in_a_terminal("serve", tiny_internlm2_dir, tmp_path / "state", f"ARGS=--port {port} --threads 1")
    child.expect_exact(f"http://127.0.0.1:{port}/v1")
    child.expect_exact("Uvicorn running", timeout=120)
    child.sendintr()
    child.expect(pexpect_eof(), timeout=60)
    child.close()
    shown = child.before
    assert child.exitstatus == 0, shown
    assert "make:" not in shown and "Interrupt" not in shown and "Traceback" not in shown


def _venv_behind_a_stamp(tmp_path: Path, stamp: str) -> tuple[Path, Path]:
    """A venv whose stamp says `stamp`, whose python is the dev venv's (so it has the dev stack, not
    the profile's) and whose pip and internlm-kit only record what they were asked to do."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").write_text(stamp + "\n")
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo "pip $*" >> {log}; exit 0; fi\n'
                      f'exec {sys.executable} "$@"\n')
    kit = venv / "bin" / "internlm-kit"
    kit.write_text(f'#!/bin/sh\necho "kit $*" >> {log}\n')
    python.chmod(0o755), kit.chmod(0o755)
    return venv, log


def test_make_setup_installs_the_profile_again_when_the_venv_lost_it_whatever_the_stamp_says(tmp_path):
    # After `internlm-kit install --rollback` the stamp still says tutorial; the venv does not.
    venv, log = _venv_behind_a_stamp(tmp_path, "tutorial")
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    done = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "setup", "PROFILE=tutorial",
                           f"VENV={venv}", "-o", f"{venv}/.installed", "-o", "chromium"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("kit install --profile tutorial") for c in calls), calls
    assert (venv / ".installed").read_text().strip() == "tutorial"


def test_a_venv_with_every_pin_of_the_profile_needs_nothing_and_a_local_build_counts():
    from setup_kit.profiles import load_profile, unmet_pins

    tutorial = load_profile("tutorial")
    versions = {p.name: p.version for p in tutorial.pins}
    versions["torch"] += "+cu121"
    assert unmet_pins(tutorial, versions.get) == []
    versions["transformers"] = "5.24.0"
    assert [p.name for p in unmet_pins(tutorial, versions.get)] == ["transformers"]
