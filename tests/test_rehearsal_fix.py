"""`doctor --fix --yes` on environments of issue 9's matrix where the tutorial's own steps fail: afterwards
those steps run (tests/fixtures/rehearsal_oracle.py, nothing of the kit), the doctor is clean and torch is
untouched. Each test works on a hard-linked clone of a cached matrix venv: pip replaces files, it never
writes into one, so the cached venv stays as it was (checked).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fixtures.rehearsal_fix_table import clone, version
from fixtures.rehearsal_matrix import matrix_venv
from fixtures.rehearsal_table import run_oracle

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("env, revision, transformers", [
    ("4.44", "latest", "4.46.3"),        # get_max_cache_shape missing before 4.46
    ("4.57", "early-2024", "4.46.3"),    # 'NoneType' object has no attribute 'shape': no version rule predicts it
    ("4.36", "june-2024", "4.38.2"),     # StaticCache missing before 4.38
    ("4.36", "latest", "4.38.2"),        # and on 4.38 the rehearsal overrules the get_max_cache_shape version rule
    ("4.57", "latest", "4.46.3"),        # get_max_cache_shape() is -1 on 4.57: the mask loses a column
    ("5.0", "early-2024", "4.46.3"),     # 5.x builds the tokenizer itself: chat tokens past the vocabulary
])
def test_fix_yes_leaves_an_environment_where_the_tutorials_steps_run(env, revision, transformers,
                                                                     revision_folders, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERNLM_KIT_STATE_DIR", str(tmp_path / "state"))
    cached = matrix_venv(env)
    cached_transformers = version(cached, "transformers")
    python = clone(cached, tmp_path / "venv")
    folder = revision_folders[revision]
    assert not run_oracle(python, folder)[0]  # broken as the matrix says
    torch = version(python, "torch")

    done = subprocess.run([sys.executable, "-m", "setup_kit", "doctor", "--fix", "--yes", "--python", str(python),
                           "--model", str(folder), "--engine", "remote-code"], capture_output=True, text=True, timeout=1200,
                          stdin=subprocess.DEVNULL)

    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Fixed: the doctor is clean" in out and "Traceback" not in out
    assert f"transformers {cached_transformers} -> {transformers}" in out  # the plan, shown
    passed, exception, _ = run_oracle(python, folder)
    assert passed, exception
    assert version(python, "torch") == torch
    assert version(cached, "transformers") == cached_transformers  # the cached venv is untouched


def test_fix_yes_repairs_a_plain_pip_install_accelerate_with_one_accelerate(revision_folders, tmp_path, monkeypatch):
    """transformers 4.34 + a plain `pip install accelerate` (0.32.1, which needs a newer huggingface-hub): one
    plan, accelerate 0.24.1, not also a second accelerate found by trying releases nor a transformers the
    import check would guess from its version rule (issue 9)."""
    monkeypatch.setenv("INTERNLM_KIT_STATE_DIR", str(tmp_path / "state"))
    python = clone(matrix_venv("4.34 plain accelerate"), tmp_path / "venv")
    folder = revision_folders["early-2024"]
    assert not run_oracle(python, folder)[0]
    done = subprocess.run([sys.executable, "-m", "setup_kit", "doctor", "--fix", "--yes", "--python", str(python),
                           "--model", str(folder), "--engine", "remote-code"], capture_output=True, text=True, timeout=1200,
                          stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Fixed: the doctor is clean" in out, out
    assert "accelerate 0.32.1 -> 0.24.1" in out and "transformers 4.34.0 ->" not in out
    assert run_oracle(python, folder)[0]
    assert version(python, "transformers") == "4.34.0" and version(python, "accelerate") == "0.24.1"
