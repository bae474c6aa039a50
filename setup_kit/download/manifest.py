"""What a download is made of: the repo's files with their sizes and published hashes, and the plan
(which of them still have to travel, how many bytes, whether they fit on the disk)."""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from setup_kit.errors import KitError, UsageError

# Room kept free beyond the files themselves (filesystems misbehave when completely full).
SPACE_MARGIN = 64 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None    # LFS files: the hub publishes their sha256
    git_sha1: str | None = None  # every file: its git blob id

    @property
    def expected_digest(self) -> str | None:
        return self.sha256 or self.git_sha1

    @property
    def digest_kind(self) -> str:
        return "sha256" if self.sha256 else ("git-sha1" if self.git_sha1 else "size")


@dataclass
class Manifest:
    repo: str
    revision: str
    commit: str | None
    files: list[RemoteFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def select(self, include: list[str] | None) -> "Manifest":
        """Keep the files matching any of the ``--include`` globs (all of them when none are given)."""
        if not include:
            return self
        kept = [f for f in self.files if any(fnmatch.fnmatch(f.path, pat) for pat in include)]
        if not kept:
            raise UsageError(
                f"--include {' '.join(include)} matches none of the {len(self.files)} files in "
                f"{self.repo}: {', '.join(f.path for f in self.files[:8])}{' ...' if len(self.files) > 8 else ''}.",
                "use a glob that matches file names in the repo, e.g. --include '*.json', or drop --include.")
        return Manifest(self.repo, self.revision, self.commit, kept)


@dataclass
class FileState:
    """Where one file stands before fetching."""
    file: RemoteFile
    status: str           # verified | check | resume | fetch
    have: int = 0         # bytes already on disk for it (a partial, or a complete-looking file)

    @property
    def to_fetch(self) -> int:
        if self.status in ("verified", "check"):
            return 0
        return self.file.size - self.have


@dataclass
class Plan:
    manifest: Manifest
    local_dir: Path
    states: list[FileState] = field(default_factory=list)

    @property
    def bytes_to_fetch(self) -> int:
        return sum(s.to_fetch for s in self.states)

    @property
    def files_to_fetch(self) -> list[FileState]:
        return [s for s in self.states if s.to_fetch > 0]


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that will hold ``path`` (its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(plan: Plan) -> None:
    """Refuse before the first byte moves when the rest of the files cannot fit."""
    need = plan.bytes_to_fetch
    if need == 0:
        return
    free = free_bytes(plan.local_dir)
    if free < need + SPACE_MARGIN:
        raise KitError(
            f"not enough disk space in {plan.local_dir}: {human_bytes(need)} still to download "
            f"(plus {human_bytes(SPACE_MARGIN)} kept free), only {human_bytes(free)} available. Nothing was downloaded.",
            "free some space there, or choose a folder on a bigger disk with --local-dir DIR "
            "(or set INTERNLM_KIT_MODELS).")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
