"""`internlm-kit doctor`: thin Typer layer over `setup_kit.doctor.diagnose`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def command(
    python: Optional[str] = typer.Option(None, "--python", metavar="PATH",
                                         help="Interpreter of the environment to check (default: this one)."),
    model: Optional[Path] = typer.Option(None, "--model", metavar="DIR", help="Also check this model folder."),
    profile: Optional[str] = typer.Option(None, "--profile", metavar="NAME",
                                          help="Compare against this profile (tutorial, current, cpu or a .toml). "
                                               "Default: the profile matching the installed transformers/torch."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show every check's details and ids."),
    only: Optional[str] = typer.Option(None, "--only", metavar="ID[,ID...]",
                                       help="Run only these checks (ids or prefixes such as 'model')."),
    list_checks: bool = typer.Option(False, "--list-checks", help="List the check ids and exit."),
    dtype: str = typer.Option("auto", "--dtype", metavar="DTYPE", help="dtype for the GPU memory and bf16 checks: "
                                                      "auto, bfloat16, float16, float32."),
    engine: str = typer.Option("native", "--engine", metavar="ENGINE",
                               help="Whose verdict: native (the kit's default engine, no remote code) or "
                                    "remote-code (trust_remote_code: remote code that cannot run is a problem)."),
) -> None:
    """Inspect an environment, the GPU stack and a model folder; print a fix for every problem.

    Exit code: 0 no problems, 1 problems found, 2 the doctor could not run.
    """
    from rich.console import Console

    from setup_kit.errors import UsageError

    if list_checks:
        from setup_kit.checks import all_checks

        for item in all_checks():
            typer.echo(f"{item.id:<28} {item.category:<20} {item.title}")
        raise typer.Exit(0)
    from setup_kit.doctor import diagnose, normalize_dtype
    from setup_kit.report import render

    if normalize_dtype(dtype) not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {dtype} is not one of auto, bfloat16, float16, float32.",
                         "Pass --dtype float16 (GPUs before compute capability 8.0) or leave it out.")
    if engine not in ("native", "remote-code"):
        raise UsageError(f"--engine {engine} is not one of native, remote-code.",
                         "Leave it out (native, the engine internlm-kit chat uses), or pass --engine remote-code "
                         "to check for trust_remote_code.")

    ids = [part.strip() for part in only.split(",") if part.strip()] if only else None
    report = diagnose(python=python, model=model, profile=profile, only=ids, dtype=dtype, engine=engine)
    if as_json:
        typer.echo(report.to_json())
    else:
        import sys

        # Into a file or a pipe, whole lines (rich would break them at 80 columns mid-path).
        render(report, Console(highlight=False, soft_wrap=not sys.stdout.isatty()), verbose=verbose)
    raise typer.Exit(report.exit_code)
