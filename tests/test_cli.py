"""The command itself: `--help` and `--version` stay light, and every verb's help reads cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from setup_kit import __version__

VERBS = ["doctor", "install", "download", "chat", "convert", "serve"]

# Runs the console script's entry point in-process, then reports which heavy modules it imported.
PROBE = """
import json, sys
sys.argv = ["internlm-kit", *json.loads(sys.argv[1])]
from setup_kit.cli import main
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "tokenizers", "huggingface_hub",
                           "fastapi", "uvicorn", "rich") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def run_cli(*args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args))],
                          capture_output=True, text=True, timeout=60)
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], *[[verb, "--help"] for verb in VERBS]],
                         ids=lambda a: " ".join(a))
def test_help_and_version_import_nothing_heavy(args):
    result, out = run_cli(*args)
    assert result["code"] == 0
    assert result["heavy"] == [], f"`internlm-kit {' '.join(args)}` imported {result['heavy']}"
    assert out.strip()


def test_version_prints_the_package_version():
    _, out = run_cli("--version")
    assert out.strip() == f"internlm-kit {__version__}"


def test_top_level_help_lists_every_verb():
    _, out = run_cli("--help")
    for verb in VERBS:
        assert f"  {verb} " in out or f"  {verb}\n" in out, verb


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_shows_a_readable_placeholder(verb):
    """Typer's default placeholders are Python types (`<str>`, `<int range>`); each value-taking
    option names what it wants instead (`--port PORT`, `--dtype DTYPE`)."""
    _, out = run_cli(verb, "--help")
    options = out.split("Options:", 1)[1]
    lines = [line for line in options.splitlines() if line.lstrip().startswith("-")]
    assert lines
    for line in lines:
        assert "<" not in line.strip().split("  ")[0], line


def test_doctor_verbose_shows_each_id_in_its_own_column():
    done = subprocess.run([sys.executable, "-m", "setup_kit", "doctor", "-v", "--only",
                           "python.version,packages.required"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    lines = [line for line in done.stdout.splitlines() if "python.version" in line or "packages.required" in line]
    assert len(lines) == 2, done.stdout
    # Padded to the longest id of the group, then two spaces: the summaries start in one column.
    assert any("✓ python.version     Python 3." in line for line in lines), lines
    assert any("packages.required  " in line and "packages.required   " not in line for line in lines), lines
