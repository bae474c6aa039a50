"""Finding a Python a profile accepts (PATH, pyenv, uv) and making a venv with it."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from setup_kit.errors import KitError

NAME = re.compile(r"^python3(\.\d+)?$")
VERSION_SCRIPT = "import platform; print(platform.python_version())"


@dataclass(frozen=True)
class FoundPython:
    path: str
    version: str
    source: str  # running | PATH | pyenv | uv


def _candidates() -> list[tuple[str, str]]:
    # The interpreter the kit runs on (its base one when that is a venv: venvs are made from bases).
    found = [(getattr(sys, "_base_executable", None) or sys.executable, "running")]
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        # pyenv's shims are slow shell scripts for the versions listed below anyway.
        if directory and os.path.isdir(directory) and os.path.basename(directory) != "shims":
            found += [(os.path.join(directory, n), "PATH") for n in sorted(os.listdir(directory)) if NAME.match(n)]
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found += [(p, "pyenv") for p in sorted(glob.glob(os.path.join(pyenv, "versions", "*", "bin", "python3")))]
    from setup_kit.install.plan import find_uv

    if uv := find_uv():
        try:
            listing = subprocess.run([uv, "python", "list", "--only-installed"], capture_output=True,
                                     text=True, timeout=20).stdout
            found += [(line.split()[-1], "uv") for line in listing.splitlines() if line.strip()
                      and os.path.isabs(line.split()[-1])]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return found


def _version_of(path: str) -> str | None:
    try:
        done = subprocess.run([path, "-I", "-c", VERSION_SCRIPT], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def find_pythons() -> list[FoundPython]:
    """Every distinct interpreter found, with its version as it reports it (asked concurrently)."""
    from concurrent.futures import ThreadPoolExecutor

    seen, unique = set(), []
    for path, source in _candidates():
        real = os.path.realpath(path)
        if real not in seen and os.access(path, os.X_OK):
            seen.add(real)
            unique.append((path, source))
    with ThreadPoolExecutor(max_workers=8) as pool:
        versions = list(pool.map(_version_of, [path for path, _ in unique]))
    return [FoundPython(path, version, source) for (path, source), version in zip(unique, versions) if version]


def pick_python(spec: str, found: list[FoundPython] | None = None) -> FoundPython:
    """The running interpreter when the spec accepts it, else the newest accepted one."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = find_pythons() if found is None else found
    accepted = [p for p in found if SpecifierSet(spec or "").contains(p.version, prereleases=True)]
    if not accepted:
        have = ", ".join(sorted({p.version for p in found})) or "none"
        raise KitError(f"No Python {spec} was found to create the venv with (found: {have}; looked on PATH, "
                       f"in pyenv's versions, and uv's when uv is present).",
                       f"Install a Python {spec} (e.g. `uv python install 3.11`, `pyenv install 3.11`, or "
                       f"`apt install python3.11-venv`), then run this again.", exit_code=2)
    running = next((p for p in accepted if p.source == "running"), None)
    return running or max(accepted, key=lambda p: Version(p.version))


def create_venv(directory: Path, python: FoundPython, installer: str) -> str:
    """Create the venv (with pip, so the user can use it directly); returns its interpreter."""
    from setup_kit.install.plan import find_uv

    uv = find_uv() if installer == "uv" else None
    argv = ([uv, "venv", "--seed", "--python", python.path, str(directory)] if uv
            else [python.path, "-m", "venv", str(directory)])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = None
        detail = str(exc)
    else:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] if done.returncode else ""
    interpreter = directory / "bin" / "python"
    if done is None or done.returncode != 0 or not interpreter.exists():
        raise KitError(f"Could not create a venv at {directory} with Python {python.version} ({python.path}): "
                       f"{' '.join(detail) if isinstance(detail, list) else detail}",
                       f"On Debian/Ubuntu install the venv module (`apt install python3.{python.version.split('.')[1]}-venv`); "
                       f"or create the venv yourself and pass --python DIR/bin/python.")
    return str(interpreter)
