"""From what the user asked for (`EngineOptions`) to a running engine.

`--model` may be a folder or a hub name such as `internlm/internlm2-chat-1_8b`; a hub name means the
folder `internlm-kit download` puts it in (`default_model_dir`). Nothing here loads weights until
the chosen engine is built.
"""

from __future__ import annotations

from pathlib import Path

from setup_kit import DEFAULT_REPO
from setup_kit.engines.base import Engine, EngineOptions
from setup_kit.errors import ModelFolderError, UsageError
from setup_kit.locations import default_model_dir

ENGINES = ("native", "remote-code", "openai")


def looks_like_repo(name: str) -> bool:
    """`owner/name` with no path syntax: what the hub calls a repo id."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not any(p in (".", "..") for p in parts))


def resolve_model_dir(model: str | None) -> Path:
    """The folder to load: the path given, or where a hub name is downloaded to; and when that is not
    there, a shared copy already on this machine (InternStudio's /root/share/new_models/...), which
    loads in place: the kit writes nothing into a model folder."""
    repo = model or DEFAULT_REPO
    if model:
        path = Path(model).expanduser()
        if path.exists() or not looks_like_repo(model):
            return path
    target = default_model_dir(repo)
    if not target.exists():
        from setup_kit.download.local import find_shared_copy
        from setup_kit.download.modelscope import modelscope_name

        shared = find_shared_copy(repo, modelscope_name(repo))
        if shared is not None:
            return shared
    return target


def missing_model_error(model: str | None, path: Path, verb: str = "chat") -> ModelFolderError:
    """verb: the make target that fetches then runs it (`make chat`, `make serve`)."""
    repo = model if model and looks_like_repo(model) and not Path(model).exists() else None
    if repo or not model:
        repo = repo or DEFAULT_REPO
        return ModelFolderError(
            f"The model {repo} is not on this machine (looked in {path}).",
            fix=f"Fetch it with `internlm-kit download {repo}` (or `make {verb}{'' if repo == DEFAULT_REPO else f' MODEL={repo}'}`, which does), "
                "or pass the folder you have with --model DIR.")
    return ModelFolderError(
        f"There is no model folder at {path}.",
        fix=f"Check the path, or run `internlm-kit doctor --model {path}` once it is there.")


def create_engine(engine: str, options: EngineOptions) -> Engine:
    """Build the engine named `engine` ("native", "remote-code" or "openai")."""
    if engine not in ENGINES:
        raise UsageError(f"Unknown engine {engine!r}.", fix=f"Use one of: {', '.join(ENGINES)}.")
    if engine == "openai":
        from setup_kit.engines.openai_engine import OpenAIEngine

        if not options.endpoint:
            raise UsageError("The openai engine needs the server's address.",
                             fix="Add --endpoint URL, e.g. --endpoint http://127.0.0.1:8000/v1")
        return OpenAIEngine(options.endpoint, model=options.model, api_key=options.api_key)
    path = resolve_model_dir(options.model)
    if not path.is_dir():
        raise missing_model_error(options.model, path)
    if engine == "remote-code":
        from setup_kit.engines.remote_code import RemoteCodeEngine

        return RemoteCodeEngine(path, device=options.device, dtype=options.dtype)
    from setup_kit.engines.native import NativeEngine

    kwargs = {"compile": True} if options.compile else {}
    return NativeEngine(path, device=options.device, dtype=options.dtype, **kwargs)
