"""Is a file name from a repo safe to write (or read) inside the model folder?

Repo listings come from a hub, a mirror, ModelScope or a folder someone shared, and the kit joins
their names to the model folder itself (huggingface_hub's own guard never runs, since the kit does
the listing). A name is safe when it is a plain relative POSIX path that stays inside the folder:
no ``..``, no absolute or drive path, no backslash (a separator on Windows), no control characters,
no ``.git`` (a planted git config runs commands), nothing in the download bookkeeping
(``.cache/huggingface``, ``.cache/internlm-kit``), and no existing link on the way that leads out.

Stdlib only: the doctor's model-folder reading uses it too.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath

BOOKKEEPING = (".cache/huggingface", ".cache/internlm-kit")


def unsafe_reason(name: object, folder: Path | None = None) -> str | None:
    """Why ``name`` must not be joined to ``folder`` (None when it is safe); with ``folder``, links
    already in it are followed to see where the name really lands."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character"
    if "\\" in name:
        return "contains a backslash (a path separator on Windows, where it can climb out of the folder)"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        return "is an absolute path" if name.startswith(("/", "\\")) else "names a drive (an absolute path on Windows)"
    parts = name.split("/")
    if ".." in parts:
        return "climbs out of the folder with '..'"
    if any(p in ("", ".") for p in parts):
        return "is not a plain path (an empty or '.' part)"
    if any(p.lower() == ".git" for p in parts):
        return "writes into .git (a planted git config runs commands)"
    if any(name == b or name.startswith(b + "/") for b in BOOKKEEPING):
        return "writes into the download's own bookkeeping (.cache)"
    if folder is not None:
        return _escapes_through_link(Path(folder), name)
    return None


def _escapes_through_link(folder: Path, name: str) -> str | None:
    """A link already in the folder (``sub -> /etc``) would carry ``sub/x`` somewhere else."""
    root = os.path.realpath(folder)
    landing = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([root, landing]) == root:
        return None
    probe = Path(folder)
    for part in name.split("/"):
        probe = probe / part
        if probe.is_symlink():
            return f"goes through the link {probe} -> {os.readlink(probe)}, out of the folder"
    return "lands outside the folder"


def unsafe_names(names: list[str], folder: Path | None = None) -> list[tuple[str, str]]:
    """Every unsafe name with its reason, and names listed twice (two files cannot share one path)."""
    found, seen = [], set()
    for name in names:
        reason = unsafe_reason(name, folder)
        if reason is None and name in seen:
            reason = "is listed twice"
        if reason:
            found.append((name, reason))
        seen.add(name)
    return found
