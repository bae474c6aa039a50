"""`internlm-kit chat`."""

from __future__ import annotations

import typer

ENGINE_HELP = "native (default: no remote code), remote-code (the tutorial's path) or openai."


def command(
    model: str = typer.Option(None, "--model", "-m", metavar="DIR|REPO",
                              help="Model folder, or a hub name (its `download` folder). "
                                   "With --engine openai: the server's model name."),
    engine: str = typer.Option("native", "--engine", "-e", metavar="NAME", help=ENGINE_HELP),
    endpoint: str = typer.Option(None, "--endpoint", metavar="URL",
                                 help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 "
                                      "(implies --engine openai)."),
    api_key: str = typer.Option(None, "--api-key", metavar="KEY", envvar="OPENAI_API_KEY",
                                help="Key for --endpoint, if the server wants one."),
    system: str = typer.Option(None, "--system", metavar="TEXT",
                               help="System prompt (default: InternLM's own)."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", metavar="N", min=1,
                                       help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.8, "--temperature", metavar="T", min=0.0),
    top_p: float = typer.Option(0.8, "--top-p", metavar="P", min=0.0, max=1.0),
    greedy: bool = typer.Option(False, "--greedy", help="Always pick the likeliest token."),
    seed: int = typer.Option(None, "--seed", metavar="N", min=0, help="Make sampling repeatable."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", metavar="DTYPE",
                              help="auto, bf16, fp16, fp32, or int8/int4 (quantized weights, CPU; "
                                   "auto on a CPU is int4)."),
    prompt: str = typer.Option(None, "--prompt", "-p", metavar="TEXT",
                               help="Answer this one message and exit."),
    as_json: bool = typer.Option(False, "--json",
                                 help="One JSON object per turn on stdout instead of text."),
    skip_checks: bool = typer.Option(False, "--skip-checks",
                                     help="Start without the doctor's pre-flight checks."),
    compile: bool = typer.Option(False, "--compile",
                                 help="Static KV cache + torch.compile (native engine, GPU)."),
    threads: int = typer.Option(None, "--threads", metavar="N", min=1,
                                help="CPU threads for torch (default: one per physical core not already busy)."),
) -> None:
    """Chat with the model in the terminal, streaming, with memory of the conversation.

    Type /help in the chat for its commands. With stdin not a terminal, each input line is one
    message and only the replies go to stdout.
    """
    from setup_kit.doctor import short_dtype
    from setup_kit.engines.quant import set_threads
    from setup_kit.repl import ChatRequest, run_chat

    set_threads(threads)
    request = ChatRequest(
        model=model, engine=engine, endpoint=endpoint, api_key=api_key, system=system,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
        seed=seed, device=device, dtype=short_dtype(dtype), prompt=prompt, as_json=as_json,
        skip_checks=skip_checks, compile=compile)
    code = run_chat(request)
    if code:
        raise typer.Exit(code)
