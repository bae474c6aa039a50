"""ModelScope as a source, through the ``modelscope`` package's own ``snapshot_download``."""

from __future__ import annotations

import glob
import inspect
import os
import threading
from pathlib import Path

from setup_kit.download.manifest import plural
from setup_kit.errors import KitError

# Hub repo -> ModelScope model id, where the names differ.
KNOWN_NAMES = {
    "internlm/internlm2-chat-1_8b": "Shanghai_AI_Laboratory/internlm2-chat-1_8b",
    "internlm/internlm2-chat-7b": "Shanghai_AI_Laboratory/internlm2-chat-7b",
    "internlm/internlm2_5-7b-chat": "Shanghai_AI_Laboratory/internlm2_5-7b-chat",
}


def modelscope_name(repo: str) -> str:
    if repo in KNOWN_NAMES:
        return KNOWN_NAMES[repo]
    owner, _, name = repo.partition("/")
    return f"Shanghai_AI_Laboratory/{name}" if owner == "internlm" else repo


def modelscope_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("modelscope") is not None


def not_installed_error(context: str = "") -> KitError:
    return KitError(
        f"{context}the `modelscope` package is not installed, so ModelScope cannot be used.",
        "pip install modelscope   (then run this again), or use --endpoint https://hf-mirror.com, "
        "or --from DIR if the files are already on this machine.")


def list_modelscope_files(repo: str, revision: str | None, token: str | None = None) -> tuple[str, list[str]]:
    """The ModelScope model id for ``repo`` and the paths its listing names, asked through the
    package's own API before anything is written, so the kit can refuse names that leave the folder
    (modelscope joins them to local_dir as they come)."""
    if not modelscope_available():
        raise not_installed_error()
    from modelscope.hub.api import HubApi  # type: ignore[import-not-found]

    model_id = modelscope_name(repo)
    api = HubApi(token=token) if token and "token" in inspect.signature(HubApi).parameters else HubApi()
    try:
        entries = api.get_model_files(model_id, revision=_revision(revision) or "master", recursive=True)
    except Exception as exc:  # modelscope raises many kinds; each means "this source failed"
        raise _failure(model_id, exc) from None
    return model_id, [e.get("Path") or e.get("Name") for e in entries if (e.get("Type") or "blob") != "tree"]


def fetch_from_modelscope(model_id: str, revision: str | None, local_dir: Path, paths: list[str],
                          token: str | None = None) -> int | None:
    """Download exactly ``paths`` (checked names from :func:`list_modelscope_files`) with ModelScope
    into ``local_dir``; returns the bytes ModelScope received this run (None where this modelscope
    cannot report them). ``token`` is ModelScope's access token; without one, modelscope uses its
    own login. The names are given as literal patterns, so a second listing that names something
    else (a server that changed its mind) fetches nothing more."""
    from modelscope import snapshot_download  # type: ignore[import-not-found]

    accepted = inspect.signature(snapshot_download).parameters
    if "local_dir" not in accepted:  # 1.9 and older only fill their own cache
        raise KitError(f"this modelscope ({_version()}) cannot download into a chosen folder (no local_dir).",
                       "pip install -U modelscope   (then run this again), or use --source hf.")
    kwargs = {"local_dir": str(local_dir)}
    if _revision(revision):
        kwargs["revision"] = revision
    # fnmatch globs in both; 1.15 knows only the older name
    kwargs["allow_patterns" if "allow_patterns" in accepted else "allow_file_pattern"] = [glob.escape(p) for p in paths]
    if token:
        if "token" not in accepted:
            raise KitError(f"this modelscope ({_version()}) does not take an access token (no token argument).",
                           "pip install -U modelscope   (then run this again), or log in with "
                           "`modelscope login` and drop --token.")
        kwargs["token"] = token
    received = [0] if "progress_callbacks" in accepted else None
    if received is not None:
        kwargs["progress_callbacks"] = [_counting_callback(received)]
    try:
        snapshot_download(model_id, **kwargs)
    except Exception as exc:  # modelscope raises many kinds; each means "this source failed"
        raise _failure(model_id, exc) from None
    return None if received is None else received[0]


def _revision(revision: str | None) -> str | None:
    """The hub's default branch is 'main', ModelScope's 'master': 'main' means its default."""
    return revision if revision and revision != "main" else None


def _counting_callback(received: list[int]) -> type:
    """ModelScope instantiates each callback class per file and calls ``update(n)`` for every chunk it
    writes (negative for what it throws away when a file starts over), so the sum is what this run fetched."""
    lock = threading.Lock()

    class CountBytes:
        def __init__(self, filename: str, file_size: int):
            pass

        def update(self, size: int) -> None:
            with lock:
                received[0] += size

        def end(self) -> None:
            pass

    return CountBytes


def _failure(model_id: str, exc: Exception) -> KitError:
    """One paragraph naming the files that failed and why: a download error lists them in ``failed_files``
    (modelscope >= 1.38); a file whose bytes did not match ModelScope's sha256/size is a different problem
    from an unreachable server and gets a different fix."""
    failed = getattr(exc, "failed_files", None) or {}
    if failed:
        details = "; ".join(f"{path}: {_first_line(err)}" for path, err in list(failed.items())[:4])
        message = f"ModelScope could not provide {plural(len(failed), 'file')} of {model_id}: {details}"
    else:
        message = f"ModelScope could not provide {model_id}: {type(exc).__name__}: {_first_line(exc)}"
    if any(cls.__name__ == "FileIntegrityError" for err in [exc, *failed.values()] for cls in type(err).__mro__):
        return KitError(message, "ModelScope served bytes that do not match the sha256/size it lists, "
                        "and they were not kept; run it again later (files that arrived intact are kept), or use "
                        "the hub or a mirror (--source hf --endpoint https://hf-mirror.com).")
    where = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "modelscope.cn"
    return KitError(message, f"check the connection to {where}, or try the hub or a mirror "
                             "(--source hf --endpoint https://hf-mirror.com).")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelscope")
    except PackageNotFoundError:
        return "unknown version"
