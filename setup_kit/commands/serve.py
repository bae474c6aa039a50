"""`internlm-kit serve`."""

from __future__ import annotations

import typer


def command(
    model: str = typer.Option(None, "--model", "-m", metavar="DIR|REPO",
                              help="Model folder, or a hub name (its `download` folder)."),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDR",
                             help="Address to listen on. Anything but 127.0.0.1 is reachable "
                                  "from other machines: set --api-key then."),
    port: int = typer.Option(8000, "--port", metavar="PORT", min=1, max=65535),
    engine: str = typer.Option("native", "--engine", "-e", metavar="NAME", help="native (the only engine the kit's server batches; remote-code is refused with what to do)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", metavar="DTYPE",
                              help="auto, bf16, fp16, fp32, or int8/int4 (quantized weights, CPU; "
                                   "auto on a CPU is int4)."),
    api_key: str = typer.Option(None, "--api-key", metavar="KEY", envvar="INTERNLM_KIT_API_KEY", show_envvar=True,
                                help="Require `Authorization: Bearer KEY` on /v1 requests."),
    max_batch: int = typer.Option(8, "--max-batch", metavar="N", min=1,
                                  help="Requests generated together in one batch (kit backend)."),
    max_queue: int = typer.Option(32, "--max-queue", metavar="N", min=0,
                                  help="Requests allowed to wait for a free slot; more get 503."),
    backend: str = typer.Option("kit", "--backend", metavar="NAME", help="kit (this process), lmdeploy or vllm."),
    tp: int = typer.Option(1, "--tp", metavar="N", min=1, help="Tensor parallelism over N GPUs (lmdeploy, vllm)."),
    model_name: str = typer.Option(None, "--model-name", metavar="NAME",
                                   help="Name clients use in `model` (default: the folder's name)."),
    skip_checks: bool = typer.Option(False, "--skip-checks",
                                     help="Start without the doctor's pre-flight checks."),
    system: str = typer.Option(None, "--system", metavar="TEXT",
                               help="System prompt for requests that bring none (default: InternLM's own; "
                                    "\"\" for none)."),
    threads: int = typer.Option(None, "--threads", metavar="N", min=1,
                                help="CPU threads for torch (default: one per physical core not already busy)."),
    default_max_tokens: int = typer.Option(1024, "--default-max-tokens", metavar="N", min=1,
                                           help="Reply budget for requests that set no max_tokens."),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", metavar="MB", min=0.001,
                                      help="Largest request body accepted; bigger ones get 413."),
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions) with a chat page at /.

    Open http://127.0.0.1:8000/ in a browser, or point any OpenAI client at
    http://127.0.0.1:8000/v1. --backend lmdeploy|vllm hands the same folder to those servers.
    """
    from setup_kit.doctor import short_dtype
    from setup_kit.engines.quant import set_threads
    from setup_kit.serve.server import ServeOptions, serve

    set_threads(threads)
    code = serve(ServeOptions(model=model, host=host, port=port, engine=engine, device=device,
                              dtype=short_dtype(dtype), api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                              backend=backend, tp=tp, model_name=model_name,
                              skip_checks=skip_checks, threads=threads, system=system,
                              default_max_tokens=default_max_tokens, max_body_mb=max_body_mb))
    if code:
        raise typer.Exit(code)
