"""The `internlm-kit` command: wires each verb to its module in `setup_kit.commands`.

Nothing heavy is imported here or in `setup_kit.commands.*` at module level:
`internlm-kit --help` must not import torch or transformers.
"""

from __future__ import annotations

import os
import sys

import typer

from setup_kit import __version__
from setup_kit.commands import chat, convert, doctor, download, install, serve
from setup_kit.errors import KitError

app = typer.Typer(
    name="internlm-kit",
    help="Get the InternLM2 chat model running on your own machine, and keep it running.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain Click help: importing rich for --help costs ~0.3 s
)

app.command("doctor")(doctor.command)
app.command("install")(install.command)
app.command("download")(download.command)
app.command("chat")(chat.command)
app.command("convert")(convert.command)
app.command("serve")(serve.command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"internlm-kit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Get the InternLM2 chat model running on your own machine, and keep it running."""


def report_error(exc: KitError) -> None:
    """One paragraph on stderr: what went wrong, then what to do next."""
    text = exc.message.rstrip()
    if exc.fix:
        text += f"\n  fix: {exc.fix}"
    print(f"internlm-kit: error: {text}", file=sys.stderr)


def main() -> None:
    try:
        app()
    except KitError as exc:
        report_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("internlm-kit: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the last catch: what slipped through every clear error is a bug
        report_bug(exc)
        sys.exit(70)  # EX_SOFTWARE


def report_bug(exc: BaseException) -> None:
    """One paragraph that says it is the kit's bug, with the traceback kept in a log file, not shown."""
    import time
    import traceback

    from setup_kit.locations import state_dir

    text = "".join(traceback.format_exception(exc))
    where = None
    try:
        folder = state_dir() / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        where = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        where.write_text(f"internlm-kit {__version__}\n$ {' '.join(sys.argv)}\n\n{text}", encoding="utf-8")
    except OSError:
        where = None
    summary = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if where is None:  # the log could not be written: the traceback is all there is, so show it
        print(text, file=sys.stderr, end="")
        kept = "Its traceback is above."
    else:
        kept = f"Its traceback is in {where}."
    print(f"internlm-kit: error: this is a bug in internlm-kit, not something you did ({summary}). {kept}\n"
          f"  fix: report it with that traceback and the command you ran; other commands still work.",
          file=sys.stderr)
