"""What a download is made of: the repo's files with their sizes and published hashes, and the plan
(which of them still have to travel, how many bytes, whether they fit on the disk)."""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from setup_kit.errors import KitError, UsageError
from setup_kit.repo_paths import unsafe_names

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


@dataclass(frozen=True)
class Selection:
    """``--include`` and ``--exclude`` with ``hf download``'s meaning: a file is kept when it matches an
    include glob (any file, when none are given) and no exclude glob. Every source filters with this."""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: list[str] | None, exclude: list[str] | None) -> "Selection":
        return cls(tuple(include or ()), tuple(exclude or ()))

    def __bool__(self) -> bool:
        """True when only part of the repo is wanted (an index may then name files left out on purpose)."""
        return bool(self.include or self.exclude)

    def keeps(self, path: str) -> bool:
        if self.include and not any(fnmatch.fnmatch(path, pat) for pat in self.include):
            return False
        return not any(fnmatch.fnmatch(path, pat) for pat in self.exclude)

    def describe(self) -> str:
        return " ".join([*(f"--include {p}" for p in self.include), *(f"--exclude {p}" for p in self.exclude)])


@dataclass
class Manifest:
    repo: str
    revision: str
    commit: str | None
    files: list[RemoteFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def select(self, selection: Selection) -> "Manifest":
        """Keep the files the ``--include``/``--exclude`` globs select (all of them when none are given)."""
        if not selection:
            return self
        kept = [f for f in self.files if selection.keeps(f.path)]
        if not kept:
            raise nothing_selected(selection, f"the {plural(len(self.files), 'file')} in {self.repo}",
                                   [f.path for f in self.files])
        return Manifest(self.repo, self.revision, self.commit, kept)

    def refuse_unsafe_paths(self, folder: Path, where: str, what: str = "repo or mirror", fix: str | None = None) -> None:
        """Refuse the whole listing when any name would land outside ``folder`` (see repo_paths)."""
        refuse_unsafe_listing([f.path for f in self.files], folder, where, what, fix)


def refuse_unsafe_listing(names: list[str], folder: Path, where: str, what: str, fix: str | None = None) -> None:
    """One paragraph naming the first unsafe name, before anything is written."""
    bad = unsafe_names(names, folder)
    if not bad:
        return
    name, reason = bad[0]
    more = f" ({plural(len(bad) - 1, 'more name')} like it)" if len(bad) > 1 else ""
    raise KitError(
        f"{where} lists a file named {name!r}, which {reason}{more}. A listing like that comes from a broken "
        f"or hostile {what}, so all of it was refused: nothing was downloaded and {folder} was left as it was.",
        fix or f"do not use this {what}; take the model from a source you trust (the official "
        "https://huggingface.co, --source modelscope, or --from DIR with a copy you made), and tell its owner.")


def nothing_selected(selection: Selection, where: str, names: list[str]) -> KitError:
    """The globs left nothing: say which, and what there was to choose from."""
    listed = f": {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}" if names else ""
    if selection.include and not any(Selection(selection.include).keeps(n) for n in names):
        return UsageError(f"--include {' '.join(selection.include)} matches none of {where}{listed}.",
                          "use a glob that matches file names in the repo, e.g. --include '*.json', or drop --include.")
    return KitError(f"{selection.describe()} leaves none of {where}{listed}.",
                    "loosen --exclude (or widen --include) so at least one file is kept; the globs match paths "
                    "in the repo, e.g. --exclude '*.bin'.")


@dataclass
class FileState:
    """Where one file stands before fetching."""
    file: RemoteFile
    status: str           # from a hub: verified | check | resume | fetch | link; from a local copy: present | link | copy
    have: int = 0         # bytes already on disk for it (a partial, or a complete-looking file)
    of: str = ""          # link from a hub: the file in the repo with the same content, fetched once for both

    @property
    def to_fetch(self) -> int:
        """Bytes still to arrive, and so to find room for (a hard link takes none)."""
        if self.status in ("verified", "check", "present", "link"):
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


def plural(n: int, noun: str) -> str:
    """'1 file', '2 files'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
