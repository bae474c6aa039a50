"""The interpreter an install goes into, and how to run pip against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

from setup_kit.errors import KitError, UsageError

# pip >= 22.2 has `install --dry-run --report` and `inspect`; older ones are driven by the kit's own pip.
MIN_PIP = (22, 2)
MIN_DRIVER_PIP = (22, 3)  # `pip --python` arrived in 22.3
# Prints the facts install needs; stdlib only, Python >= 3.8.
FACTS_SCRIPT = """
import json, platform, sys
try:
    from importlib.metadata import version
    pip = version("pip")
except Exception:
    pip = None
print(json.dumps({"version": platform.python_version(), "pip": pip,
                  "in_virtualenv": sys.prefix != getattr(sys, "base_prefix", sys.prefix)}))
"""
QUIET_PIP = ("--disable-pip-version-check", "--no-input")


@dataclass
class Target:
    python: str  # absolute path of the interpreter
    version: str  # "3.11.7"
    pip: tuple[str, ...]  # argv prefix that runs pip for this target
    in_virtualenv: bool = False
    created: bool = False  # made by `--venv` in this run
    notes: list[str] = field(default_factory=list)

    def pip_command(self, *args: str) -> list[str]:
        return [*self.pip, *args]


def _release(text: str | None) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release if text else ()
    except InvalidVersion:
        return ()


def inspect_target(python: str | None) -> Target:
    """Facts about the target interpreter (the running one when None), checked by running it."""
    from setup_kit.probe import resolve_python

    exe = resolve_python(python)
    try:
        done = subprocess.run([exe, "-I", "-c", FACTS_SCRIPT], capture_output=True, text=True, timeout=30)
        facts = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise UsageError(f"Could not run the interpreter {exe} ({exc}).",
                         "Point --python at a working Python >= 3.8, or use --venv DIR to create one.") from None
    target = Target(exe, facts["version"], (), bool(facts.get("in_virtualenv")))
    theirs, ours = _release(facts.get("pip")), _release(_own_pip())
    if ours >= MIN_DRIVER_PIP and ours > theirs:
        # The newer pip drives the target through `pip --python`: a fresh venv's bundled pip is
        # often years old (23.2 downloads whole wheels just to read their metadata), and a venv
        # made --without-pip has none.
        target.pip = (sys.executable, "-m", "pip", "--python", exe, *QUIET_PIP)
        have = f"pip {facts['pip']}" if facts.get("pip") else "no pip"
        target.notes.append(f"{exe} has {have}: the kit's newer pip {_own_pip()} drives it (pip --python)")
    elif theirs >= MIN_PIP:
        target.pip = (exe, "-m", "pip", *QUIET_PIP)
    else:
        raise KitError(f"{exe} has no usable pip (found {facts.get('pip') or 'none'}; need >= 22.2), "
                       f"and the kit's own interpreter has none either.",
                       f"Run `{exe} -m ensurepip --upgrade` (or install pip there), then try again.")
    if not target.in_virtualenv and not os.access(os.path.dirname(exe), os.W_OK):
        target.notes.append(f"{exe} is a system interpreter outside any venv: pip may refuse or need --user")
    return target


def _own_pip() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pip")
    except PackageNotFoundError:
        return None
