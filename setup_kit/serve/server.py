"""Load the model once, wrap it in the batching scheduler and the app, and run uvicorn."""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from setup_kit.errors import KitError, UsageError

if TYPE_CHECKING:
    from setup_kit.serve.app import ServedModel

# The `serve` extra (pyproject.toml); only the kit backend needs it, not --backend lmdeploy|vllm.
SERVE_PACKAGES = {"fastapi": "fastapi>=0.110", "uvicorn": "uvicorn>=0.29", "pydantic": "pydantic>=2"}

log = logging.getLogger("internlm_kit.serve")


def served_model(model, tokenizer, model_id: str, *, max_batch: int = 8, max_queue: int = 32,
                 eos_ids: set[int] | None = None, system: str | None = None,
                 default_max_tokens: int | None = None, max_body_bytes: int | None = None) -> ServedModel:
    from setup_kit.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS, ServedModel
    from setup_kit.serve.scheduler import BatchScheduler

    if not eos_ids:
        from setup_kit.engines.native import eos_token_ids

        eos_ids = set(eos_token_ids(model, tokenizer))
    scheduler = BatchScheduler(model.eval(), tokenizer, eos_ids=eos_ids,
                               max_batch=max_batch, max_queue=max_queue)
    return ServedModel(id=model_id, tokenizer=tokenizer, scheduler=scheduler, system=system,
                       default_max_tokens=default_max_tokens or DEFAULT_MAX_TOKENS,
                       max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)


def load_served_model(model_dir: Path, model_id: str, *, device: str = "auto", dtype: str = "auto",
                      max_batch: int = 8, max_queue: int = 32, system: str | None = None,
                      default_max_tokens: int | None = None, max_body_bytes: int | None = None) -> ServedModel:
    from setup_kit.engines.native import load_model_and_tokenizer

    model, tokenizer, info = load_model_and_tokenizer(model_dir, device=device, dtype=dtype)
    from setup_kit.serve import cpu_linear

    faster = cpu_linear.prepare(model, max_rows=max_batch)
    served = served_model(model, tokenizer, model_id, max_batch=max_batch, max_queue=max_queue,
                          eos_ids=set(info.eos_token_ids), system=system,
                          default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes)
    served.notes = (faster,) if faster else ()
    return served


def uvicorn_server(served: ServedModel, *, host: str, port: int, api_key: str | None,
                   log_level: str = "info"):
    """uvicorn on the app, ending every open reply at once on SIGTERM/Ctrl-C: streams get an error
    event and [DONE], non-streaming requests a 503, instead of being cut when the grace time ends."""
    import uvicorn

    from setup_kit.serve.app import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            served.scheduler.close()
            super().handle_exit(sig, frame)

    app = create_app(served, api_key=api_key)
    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=1))


def run(served: ServedModel, *, host: str, port: int, api_key: str | None, log_level: str = "info") -> None:
    import signal

    server = uvicorn_server(served, host=host, port=port, api_key=api_key, log_level=log_level)
    # uvicorn re-raises the signal it shut down for once it is done; this handler takes that SIGTERM
    # (a clean exit, code 0) and one that arrives before uvicorn installs its own.
    previous = signal.signal(signal.SIGTERM, lambda *_: server.handle_exit(signal.SIGTERM, None))
    try:
        server.run()
    except KeyboardInterrupt:  # the re-raised Ctrl-C, after the same clean shutdown
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class ServeOptions:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "native"
    device: str = "auto"
    dtype: str = "auto"
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 32
    backend: str = "kit"
    tp: int = 1
    model_name: str | None = None
    skip_checks: bool = False
    threads: int | None = None
    system: str | None = None
    default_max_tokens: int | None = None
    max_body_mb: float | None = None


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(options: ServeOptions) -> int:
    """Run `internlm-kit serve` to the end; the exit code."""
    from setup_kit.engines.select import missing_model_error, resolve_model_dir

    if options.backend not in ("kit", "lmdeploy", "vllm"):
        raise UsageError(f"Unknown backend {options.backend!r}.", "Use --backend kit, lmdeploy or vllm.")
    if options.engine not in ("native", "remote-code"):
        raise UsageError(f"Unknown engine {options.engine!r}.", "Use --engine native or remote-code.")
    model_dir = resolve_model_dir(options.model)
    if not model_dir.is_dir():
        raise missing_model_error(options.model, model_dir, verb="serve")
    name = options.model_name or _default_name(options.model, model_dir)
    _warn_if_exposed(options)
    if options.backend != "kit":
        from setup_kit.serve.backends import run_backend

        return run_backend(options.backend, model_dir, name=name, host=options.host, port=options.port,
                           tp=options.tp, api_key=options.api_key, dtype=options.dtype)
    if options.engine == "remote-code":
        raise UsageError(
            "The kit's server batches requests on the native engine only; the remote code cannot share "
            "one batch between requests.",
            "Drop --engine remote-code (the native engine runs the same weights without remote code), "
            "or use `internlm-kit chat --engine remote-code` for a single conversation.")
    require_serve_packages()
    check_port_free(options.host, options.port)  # before the model loads, not after
    if not options.skip_checks:
        from setup_kit.repl import preflight

        preflight("native", model_dir, options.device, options.dtype)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    console = Console(stderr=True, highlight=False)
    console.print(f"internlm-kit serve: loading {model_dir} ...")
    served = load_served_model(model_dir, name, device=options.device, dtype=options.dtype,
                               max_batch=options.max_batch, max_queue=options.max_queue,
                               system=options.system, default_max_tokens=options.default_max_tokens,
                               max_body_bytes=int(options.max_body_mb * 1024 * 1024) if options.max_body_mb else None)
    if not options.model_name:
        served.aliases = tuple(sorted(served_aliases(model_dir) - {name}))
    # A wildcard address listens everywhere but is not one a browser can open: show this machine's.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(options.host, options.host)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"internlm-kit serve: model '{name}' (context {served.context_window} tokens)\n"
                  f"  chat page:  http://{shown}:{options.port}/\n"
                  f"  OpenAI API: http://{shown}:{options.port}/v1"
                  + ("  (API key required)" if options.api_key else "")
                  + "".join(f"\n  {note}" for note in served.notes))
    console.print(openai_snippet(name, f"http://{shown}:{options.port}/v1", options.api_key), soft_wrap=True)
    run(served, host=options.host, port=options.port, api_key=options.api_key)
    return 0


def check_port_free(host: str, port: int) -> None:
    """A clear error now when the address cannot be bound, instead of uvicorn's after the model loaded."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise KitError(f"Port {port} on {host} is already in use (another server, or an earlier "
                               "`internlm-kit serve` still running).",
                               f"Pick another port: --port {port + 1}, or stop what listens there "
                               f"(`ss -ltnp 'sport = :{port}'` shows it).") from None
            if exc.errno == errno.EACCES:
                raise KitError(f"Binding port {port} needs privileges this user does not have.",
                               "Use a port above 1023, e.g. --port 8000.") from None
            raise KitError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.",
                           "Check --host (an address of this machine, 127.0.0.1 or 0.0.0.0) and --port.") from None


def require_serve_packages() -> None:
    """A clear error naming the install command when the kit's HTTP stack is not installed here."""
    missing = [spec for module, spec in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        from setup_kit.checks.fixes import pip_install

        names = [spec.split(">")[0] for spec in missing]
        named = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        raise KitError(
            f"The kit's server needs {named}, which this Python "
            f"environment ({sys.executable}) does not have (they come with the kit's `serve` extra).",
            f"{pip_install(sys.executable, missing)} (or pip install 'internlm-kit[serve]'); "
            "--backend lmdeploy or vllm does not need them.")


def _default_name(model: str | None, model_dir: Path) -> str:
    from setup_kit.engines.select import looks_like_repo

    if model and looks_like_repo(model) and not Path(model).exists():
        return model
    if not model:
        from setup_kit import DEFAULT_REPO

        return DEFAULT_REPO
    return model_dir.resolve().name


def served_aliases(model_dir: Path) -> set[str]:
    """Names a request may use besides the served one: the folder's own, and the hub repo the folder
    came from (the kit's download record, else config.json's _name_or_path)."""
    import json

    from setup_kit.modelfolder import KIT_MANIFEST, REPO_ID

    names = {model_dir.resolve().name}
    for source, key in ((KIT_MANIFEST, "repo"), ("config.json", "_name_or_path")):
        try:
            found = json.loads((model_dir / source).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, str) and REPO_ID.match(found):
            names.add(found)
            break
    return names


def openai_snippet(name: str, base_url: str, api_key: str | None) -> str:
    """Python that talks to this server as started, with the exact model name it serves."""
    key = "os.environ['INTERNLM_KIT_API_KEY']" if api_key else '"none"'
    head = "import os\n  " if api_key else ""
    return ("  from Python (pip install openai):\n"
            f"  {head}from openai import OpenAI\n"
            f"  client = OpenAI(base_url=\"{base_url}\", api_key={key})\n"
            f"  reply = client.chat.completions.create(model=\"{name}\", "
            "messages=[{\"role\": \"user\", \"content\": \"Hello!\"}])\n"
            "  print(reply.choices[0].message.content)")


def _warn_if_exposed(options: ServeOptions) -> None:
    if options.host not in LOCAL_HOSTS and not options.api_key:
        Console(stderr=True, highlight=False).print(
            f"[yellow]warning:[/yellow] listening on {options.host} without an API key: anyone who can "
            "reach this machine can use the model. Set --api-key KEY (or INTERNLM_KIT_API_KEY).")
