"""The Hugging Face hub (or a mirror of it) as a source.

huggingface_hub does all the HTTP: ``HfApi.model_info(files_metadata=True)`` for the file list with
sizes and hashes, ``get_hf_file_metadata`` where a mirror leaves those out, ``hf_hub_url`` and
``http_get(url, f, resume_size=...)`` for the bytes. What the kit adds is what huggingface_hub 2.x
does not do (see DESIGN.md): partial files that survive the process (``.cache/internlm-kit/partial/``,
named by the content's hash so a partial is only ever continued with the same content), hashing
while writing, and a refusal to call anything complete that does not match the hub's metadata.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from setup_kit import __version__
from setup_kit.download.integrity import (
    HashingWriter,
    VerifiedRecord,
    hash_file,
    new_hasher,
    state_dir_for,
)
from setup_kit.download.manifest import Manifest, RemoteFile
from setup_kit.errors import KitError

try:  # POSIX: one writer per partial file, so two runs into one folder cannot interleave bytes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
MIRROR_HINT = "https://hf-mirror.com"


class HubUnreachable(KitError):
    """The hub (or the mirror) did not answer usefully: down, refused, timed out, offline, 5xx."""


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` cannot be a hub endpoint (None when it can). huggingface_hub does not check: a
    malformed HF_ENDPOINT stops it at import, a malformed --endpoint deep inside the HTTP client."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "it does not start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    return None


def check_endpoints(endpoint: str | None) -> None:
    """Refuse a malformed --endpoint or HF_ENDPOINT before huggingface_hub is imported."""
    from setup_kit.errors import UsageError

    example = f"with its scheme, e.g. {MIRROR_HINT} or https://huggingface.co"
    env = os.environ.get("HF_ENDPOINT")
    for given, name, fix in ((endpoint, f"--endpoint {endpoint!r}", f"give the hub's or the mirror's address {example}."),
                             (env, f"HF_ENDPOINT={env!r}", f"set HF_ENDPOINT to the hub's or the mirror's address "
                                                            f"{example}, or unset it.")):
        if given is not None and (problem := endpoint_problem(given)):
            raise UsageError(f"{name} is not a URL the hub client can use: {problem}.", fix)


def resolve_endpoint(endpoint: str | None) -> str:
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def offline_mode() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def download_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


# ---------------------------------------------------------------- the file list


def fetch_manifest(repo: str, revision: str, endpoint: str, token: str | None = None) -> Manifest:
    """The repo's files at ``revision``, with sizes and the hashes the hub publishes. ``token`` None lets
    huggingface_hub use HF_TOKEN or the saved login, as ``hf download`` does."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="internlm-kit", library_version=__version__)
    with hub_errors(repo, revision, endpoint):
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=download_timeout())
        commit = info.sha
        files = []
        for s in info.siblings or []:
            if s.size is None:  # some mirrors answer without file metadata: ask per file
                files.append(_file_from_head(repo, s.rfilename, commit or revision, endpoint, token))
            else:
                files.append(RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id))
    if not files:
        raise KitError(f"{endpoint} lists no files for {repo} at revision {revision}.",
                       "check the repo name and --revision.")
    return Manifest(repo, revision, commit, files)


def _file_from_head(repo: str, path: str, revision: str, endpoint: str, token: str | None) -> RemoteFile:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(repo, path, revision=revision, endpoint=endpoint), token=token,
                                timeout=download_timeout(), endpoint=endpoint)
    etag = (meta.etag or "").lower()
    if meta.size is None:
        raise KitError(f"{endpoint} does not say how big {path} is, so it cannot be verified.",
                       f"use the official hub or a complete mirror (--endpoint {MIRROR_HINT}), or --source modelscope.")
    return RemoteFile(path, meta.size, etag if SHA256_RE.match(etag) else None,
                      etag if SHA1_RE.match(etag) else None)


# ---------------------------------------------------------------- partial files


def partial_path(local_dir: Path, rf: RemoteFile) -> Path:
    key = rf.expected_digest or f"{rf.path.replace('/', '__')}.{rf.size}"
    return state_dir_for(local_dir) / "partial" / f"{key}.part"


def adopt_hf_orphan(local_dir: Path, rf: RemoteFile) -> None:
    """A killed ``hf download`` leaves ``<hash>.<etag>.<random>.incomplete``: continue the longest one."""
    if not rf.expected_digest:
        return
    orphans_dir = Path(local_dir) / ".cache" / "huggingface" / "download"
    if not orphans_dir.is_dir():
        return
    orphans = [p for p in orphans_dir.rglob(f"*.{rf.expected_digest}.*incomplete") if p.is_file()]
    if not orphans:
        return
    part = partial_path(local_dir, rf)
    have = part.stat().st_size if part.exists() else 0
    best = max(orphans, key=lambda p: p.stat().st_size)
    if have < best.stat().st_size <= rf.size:
        part.parent.mkdir(parents=True, exist_ok=True)
        os.replace(best, part)
    for p in orphans:
        with contextlib.suppress(OSError):
            p.unlink()


def drop_stale_partials(local_dir: Path, manifest: Manifest) -> None:
    """Partials of files this revision no longer has (an earlier revision's shards) are dead weight."""
    wanted = {partial_path(local_dir, rf).name for rf in manifest.files}
    folder = state_dir_for(local_dir) / "partial"
    for part in folder.glob("*.part") if folder.is_dir() else []:
        if part.name not in wanted:
            part.unlink(missing_ok=True)


# ---------------------------------------------------------------- fetching one file


@dataclass
class Fetched:
    path: str
    transferred: int
    resumed_from: int
    refetched: bool


def fetch_file(manifest: Manifest, rf: RemoteFile, local_dir: Path, endpoint: str,
               record: VerifiedRecord, on_bytes=None, token: str | None = None) -> Fetched:
    """Bring ``rf`` into ``local_dir``: continue its partial, hash while writing, move it in place
    only when size and hash match. Wrong bytes are thrown away and fetched once more."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(manifest.repo, rf.path, revision=manifest.commit or manifest.revision, endpoint=endpoint)
    headers = build_hf_headers(token=token, library_name="internlm-kit", library_version=__version__)
    part = partial_path(local_dir, rf)
    part.parent.mkdir(parents=True, exist_ok=True)
    adopt_hf_orphan(local_dir, rf)
    first_offset, transferred, refetched = None, 0, False
    for attempt in range(2):
        with _locked_partial(part) as raw:
            have = raw.seek(0, os.SEEK_END)
            if have > rf.size:
                raw.truncate(0)
                have = raw.seek(0)
            first_offset = have if first_offset is None else first_offset
            hasher = hash_file(part, rf, limit=have) if have else new_hasher(rf)
            counter = _Counter(on_bytes)
            writer = HashingWriter(raw, part, rf, hasher, on_bytes=counter)
            try:
                _http_get(url, writer, have, headers, rf, manifest, endpoint)
            finally:
                transferred += counter.n
                raw.flush()
            size = raw.seek(0, os.SEEK_END)
            if size == rf.size and (not rf.expected_digest or writer.hasher.hexdigest() == rf.expected_digest):
                final = Path(local_dir) / rf.path
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, final)
                record.mark(final, rf)
                tell_huggingface_hub(local_dir, rf, manifest)
                return Fetched(rf.path, transferred, first_offset, refetched)
            raw.truncate(0)  # wrong bytes: never keep them, never resume from them
            if on_bytes:
                on_bytes(-counter.n - have)
            refetched = True
    part.unlink(missing_ok=True)
    raise KitError(
        f"{rf.path} from {endpoint} does not match the hub's metadata ({rf.digest_kind} "
        f"{rf.expected_digest}, {rf.size} bytes) even after fetching it again.",
        f"the server or a proxy is altering the file: try another endpoint (--endpoint {MIRROR_HINT} "
        "or the official https://huggingface.co), or --source modelscope.")


class _Counter:
    def __init__(self, on_bytes):
        self.n, self._on = 0, on_bytes

    def __call__(self, n: int) -> None:
        self.n += n
        if self._on:
            self._on(n)


@contextlib.contextmanager
def _locked_partial(part: Path):
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    raw = os.fdopen(fd, "r+b")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(raw.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise KitError(f"another download is writing {part} right now.",
                               "wait for it to finish (or stop it), then run this again.") from None
        yield raw
    finally:
        raw.close()


def _http_get(url, writer, have, headers, rf, manifest, endpoint):
    from huggingface_hub import file_download
    from huggingface_hub.utils import silent_tqdm

    kwargs = {"resume_size": have, "headers": headers, "expected_size": rf.size, "displayed_filename": rf.path}
    if "tqdm_class" in inspect.signature(file_download.http_get).parameters:  # huggingface_hub >= 1.x
        kwargs["tqdm_class"] = silent_tqdm  # the kit draws its own progress
    with hub_errors(manifest.repo, manifest.revision, endpoint, file=rf.path):
        file_download.http_get(url, writer, **kwargs)


@contextlib.contextmanager
def network_sized_chunks():
    """Have ``http_get`` hand over bytes as they arrive instead of re-assembling 10 MiB chunks.

    ``http_get`` reads ``constants.DOWNLOAD_CHUNK_SIZE`` at call time. With it at 10 MiB a killed run
    loses up to 10 MiB that had already arrived, and every byte is copied once more to build the
    chunk; with None a kill loses at most one network read and the client does less work (measured
    by benchmarks/download_speed.py). Restored afterwards: other users of huggingface_hub in the
    process see their default again.
    """
    from huggingface_hub import constants

    saved = constants.DOWNLOAD_CHUNK_SIZE
    constants.DOWNLOAD_CHUNK_SIZE = None
    try:
        yield
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = saved


def tell_huggingface_hub(local_dir: Path, rf: RemoteFile, manifest: Manifest) -> None:
    """Write huggingface_hub's own per-file metadata, so a later ``hf download`` into this folder
    recognises the file instead of hashing or fetching it again."""
    if not (manifest.commit and rf.expected_digest):
        return
    with contextlib.suppress(Exception):
        from huggingface_hub._local_folder import write_download_metadata

        write_download_metadata(local_dir=Path(local_dir), filename=rf.path,
                                commit_hash=manifest.commit, etag=rf.expected_digest)


# ---------------------------------------------------------------- errors


def _network_errors() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError):
            mod = __import__(module)
            classes.append(mod.RequestError if hasattr(mod, "RequestError") else mod.RequestException)
            if hasattr(mod, "InvalidURL"):  # httpx's is no RequestError
                classes.append(mod.InvalidURL)
    return tuple(classes)


@contextlib.contextmanager
def hub_errors(repo: str, revision: str, endpoint: str, file: str | None = None):
    """Turn huggingface_hub's and the network's exceptions into one paragraph with what to try next."""
    from huggingface_hub import errors as hf

    never = type("_Never", (Exception,), {})  # stands in for classes an older huggingface_hub lacks
    gated, revision_missing, repo_missing, entry_missing, offline = (
        getattr(hf, name, never) for name in ("GatedRepoError", "RevisionNotFoundError", "RepositoryNotFoundError",
                                               "RemoteEntryNotFoundError", "OfflineModeIsEnabled"))
    what = f"{repo}/{file}" if file else repo
    alternatives = (f"try a mirror (--endpoint {MIRROR_HINT}, or HF_ENDPOINT), --source modelscope, "
                    "or --from DIR if the files are already on this machine")
    try:
        yield
    except gated as exc:
        raise KitError(f"{repo} on {endpoint} needs you to accept its licence first ({_first_line(exc)}).",
                       "accept it on the model page, then `hf auth login`, and run this again.") from None
    except revision_missing:
        raise KitError(f"{endpoint} has no revision {revision!r} of {repo}.",
                       "check --revision (a branch, tag or commit id), or leave it out for 'main'.",
                       exit_code=1) from None
    except repo_missing:
        raise KitError(f"{endpoint} says there is no repository {repo} (404).",
                       f"check the name (the default is internlm/internlm2-chat-1_8b); {alternatives}.") from None
    except entry_missing:
        raise listing_mismatch(endpoint, what) from None
    except offline:
        raise HubUnreachable("HF_HUB_OFFLINE is set, so the hub cannot be asked for the files.",
                             "unset HF_HUB_OFFLINE, or use --source local --from DIR.") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 404 and file:
            raise listing_mismatch(endpoint, what) from None
        if status in (401, 403):
            # Reachable, but it refuses: a private or gated repo, a wrong token, or a proxy's block page.
            raise HubUnreachable(
                f"{endpoint} refused {what} (HTTP {status}): {_first_line(exc)}.",
                "if the repo is private or gated, accept its terms on the model page and pass a token with "
                "read access (--token, HF_TOKEN or `hf auth login`); if a token was given, check it; "
                f"if a proxy blocks the hub here, {alternatives}.") from None
        raise HubUnreachable(f"{endpoint} answered HTTP {status} while fetching {what}: {_first_line(exc)}.",
                             f"the hub may be down or blocked here; {alternatives}. Run it again later to resume.") from None
    except _network_errors() as exc:
        raise HubUnreachable(
            f"could not download {what} from {endpoint}: {type(exc).__name__}: {_first_line(exc) or 'no answer'}.",
            f"check the connection; {alternatives}. Running it again resumes where it stopped.") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise KitError(f"the disk filled up while writing {what}.",
                           "free some space (or use --local-dir on a bigger disk) and run it again: "
                           "it resumes where it stopped.") from None
        raise KitError(f"downloading {what} from {endpoint} failed: {_first_line(exc)}.",
                       f"run it again to resume; if it keeps failing, {alternatives}.") from None


def listing_mismatch(endpoint: str, what: str) -> KitError:
    """A file the listing names is not there: no mirror or retry mends a repo that contradicts itself."""
    return KitError(
        f"{endpoint} lists {what} but answers 404 when asked for it: the repo's listing does not match its "
        "own files, so the repo (or the mirror serving it) is broken or hostile.",
        "do not use this repo or mirror as it stands; take the model from a source you trust (the official "
        "https://huggingface.co, --source modelscope, or --from DIR with a copy you made), and tell its owner.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else ""
