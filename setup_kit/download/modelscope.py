"""ModelScope as a source, through the ``modelscope`` package's own ``snapshot_download``."""

from __future__ import annotations

from pathlib import Path

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


def fetch_from_modelscope(repo: str, revision: str | None, local_dir: Path, include: list[str] | None) -> str:
    """Download with ModelScope into ``local_dir``; returns the ModelScope model id used."""
    if not modelscope_available():
        raise not_installed_error()
    from modelscope import snapshot_download  # type: ignore[import-not-found]

    model_id = modelscope_name(repo)
    kwargs = {"local_dir": str(local_dir)}
    if revision and revision != "main":
        kwargs["revision"] = revision
    if include:
        kwargs["allow_patterns"] = include
    try:
        snapshot_download(model_id, **kwargs)
    except Exception as exc:  # modelscope raises many kinds; each means "this source failed"
        raise KitError(f"ModelScope could not provide {model_id}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                       "check the connection to modelscope.cn, or try the hub or a mirror "
                       "(--source hf --endpoint https://hf-mirror.com).") from None
    return model_id
