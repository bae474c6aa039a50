"""Proving a file is the one the hub describes: sizes, sha256 (LFS files), git blob sha1 (the rest).

Hashes are computed while the bytes are written (`HashingWriter`), so a file that was just fetched
costs no second read. `VerifiedRecord` remembers (size, mtime, inode) of files already proven, so
re-running on a complete folder reads nothing; any change to a file (a rewrite, a truncation, a
copy over it) changes its stat and sends it back to a full hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import BinaryIO

from setup_kit.download.manifest import RemoteFile
from setup_kit.modelfolder import KIT_STATE_DIR

READ_CHUNK = 8 * 1024 * 1024


def new_hasher(rf: RemoteFile):
    """The hash the hub publishes for this file: sha256 for LFS files, git's blob sha1 otherwise."""
    if rf.sha256:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % rf.size)
    return h


def hash_file(path: Path, rf: RemoteFile, limit: int | None = None, on_bytes=None):
    """Hash ``path`` (its first ``limit`` bytes) the way ``rf`` expects; returns the hasher."""
    h = new_hasher(rf)
    remaining = limit if limit is not None else -1
    with open(path, "rb", buffering=0) as f:
        while remaining != 0:
            chunk = f.read(READ_CHUNK if remaining < 0 else min(READ_CHUNK, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h


class HashingWriter:
    """The file object handed to ``huggingface_hub.http_get``: writes through and hashes on the way.

    ``http_get`` writes, asks ``tell()``, and when a server ignores a Range request it seeks back to
    where the transfer started and truncates; the hash follows all of that.
    """

    def __init__(self, raw: BinaryIO, path: Path, rf: RemoteFile, hasher, on_bytes=None):
        self._raw, self._path, self._rf = raw, path, rf
        self.hasher = hasher
        self._on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        n = self._raw.write(data)
        self.hasher.update(data)
        if self._on_bytes:
            self._on_bytes(len(data))
        return n

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        size = self._raw.tell() if size is None else size
        self._raw.flush()
        result = self._raw.truncate(size)
        self.hasher = hash_file(self._path, self._rf, limit=size)  # the prefix that is left
        return result

    def flush(self) -> None:
        self._raw.flush()


def digest_matches(hasher, rf: RemoteFile) -> bool:
    return hasher.hexdigest() == rf.expected_digest


class VerifiedRecord:
    """``<local_dir>/.cache/internlm-kit/verified.json``: files proven against the hub's metadata."""

    def __init__(self, local_dir: Path, trust: bool = True):
        self.path = state_dir_for(local_dir) / "verified.json"
        self._trust = trust  # False: every file is hashed again (--recheck), the record is rewritten
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text())
            self._entries: dict[str, dict] = data.get("files", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._entries = {}

    def is_verified(self, file: Path, rf: RemoteFile) -> bool:
        entry = self._entries.get(rf.path)
        if not self._trust or not entry or entry.get("digest") != rf.expected_digest:
            return False
        try:
            st = file.stat()
        except OSError:
            return False
        return [st.st_size, st.st_mtime_ns, st.st_ino] == [entry.get("size"), entry.get("mtime_ns"), entry.get("ino")]

    def mark(self, file: Path, rf: RemoteFile) -> None:
        st = file.stat()
        with self._lock:
            self._entries[rf.path] = {"digest": rf.expected_digest, "size": st.st_size,
                                      "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
            self._save()

    def forget(self, rf: RemoteFile) -> None:
        with self._lock:
            if self._entries.pop(rf.path, None) is not None:
                self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"files": self._entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def state_dir_for(local_dir: Path) -> Path:
    """The kit's bookkeeping inside a model folder (beside huggingface_hub's own ``.cache/huggingface``)."""
    return Path(local_dir) / KIT_STATE_DIR
