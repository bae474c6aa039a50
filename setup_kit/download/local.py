"""A copy that is already on this machine: InternStudio's shared folder, or ``--from DIR``.

Files are hard-linked when source and destination share a filesystem and copied otherwise; symlinks
in the source are followed, so the result never holds a link that can dangle. With no hub metadata
to compare against, the copy is checked for what can be proven from the files themselves: every
safetensors file's header agrees with its size, every shard the index names is there, and each
copy has its source's size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from setup_kit.download.manifest import RemoteFile, Selection
from setup_kit.repo_paths import unsafe_reason

SHARE_ROOTS = ("/root/share", "/share")
SKIP_DIRS = {".git", ".cache", "__pycache__"}


def share_roots() -> list[Path]:
    """``INTERNLM_KIT_SHARE_ROOTS`` (os.pathsep-separated) overrides the InternStudio defaults."""
    env = os.environ.get("INTERNLM_KIT_SHARE_ROOTS")
    roots = env.split(os.pathsep) if env is not None else SHARE_ROOTS
    return [Path(r) for r in roots if r]


def candidate_folders(repo: str, modelscope_name: str | None) -> list[Path]:
    name = repo.split("/")[-1]
    owners = [repo.split("/")[0]] + ([modelscope_name.split("/")[0]] if modelscope_name else [])
    found = []
    for root in share_roots():
        for owner in reversed(owners):  # InternStudio files them under the ModelScope owner
            found += [root / "new_models" / owner / name, root / "model" / owner / name]
    return found


def find_shared_copy(repo: str, modelscope_name: str | None) -> Path | None:
    for folder in candidate_folders(repo, modelscope_name):
        if (folder / "config.json").is_file():
            return folder
    return None


def list_local_files(src: Path, selection: Selection = Selection()) -> list[RemoteFile]:
    files = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(src).as_posix()
            if not selection.keeps(rel):
                continue
            if not path.exists():  # a dangling link in the share: leave it out, the check will notice
                continue
            files.append(RemoteFile(rel, path.stat().st_size))
    return files


def place_file(src: Path, dest: Path) -> str:
    """Hard-link (same filesystem) or copy ``src`` (symlinks resolved) to ``dest``; returns how."""
    real = Path(os.path.realpath(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".internlm-kit-tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(real, tmp)
        how = "linked"
    except OSError:
        shutil.copyfile(real, tmp)
        how = "copied"
    os.replace(tmp, dest)
    return how


def structure_problems(folder: Path) -> list[str]:
    """What is provably wrong with a model folder, from its own files."""
    problems = []
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        problems.append("config.json is missing")
    else:
        try:
            json.loads((folder / "config.json").read_text())
        except ValueError as exc:
            problems.append(f"config.json is not valid JSON ({exc})")
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            problems.append(f"model.safetensors.index.json is unreadable ({exc})")
            shards = []
        unsafe = {s: reason for s in shards if (reason := unsafe_reason(s))}  # links: a share's own layout
        problems += [f"the index names the shard {s!r}, which {reason}" for s, reason in unsafe.items()]
        problems += [f"{s} is missing (named by the index)" for s in shards
                     if s not in unsafe and not (folder / s).is_file()]
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            problems.append(f"{path.name}: {problem}")
    for path in sorted(folder.glob("*.model")):
        if path.read_bytes()[:64].startswith(b"version https://git-lfs"):
            problems.append(f"{path.name} is a git-lfs pointer, not the file (cloned without git-lfs)")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file states its own length: 8 bytes + header + the last tensor's end offset."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"only {size} bytes, too short to be safetensors"
        n = struct.unpack("<Q", head)[0]
        if n > min(size, 100 * 1024 * 1024):
            return "header length is impossible (not a safetensors file, or a git-lfs pointer)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not valid JSON (truncated or corrupted)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{size} bytes on disk but its header describes {expected} (truncated or corrupted)"
    return None
