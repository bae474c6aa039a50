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
    dtype: str = typer.Option("auto", "--dtype", metavar="DTYPE", help="dtype for the memory and bf16 checks: "
                                                      "auto, bfloat16, float16, float32; or the CPU formats "
                                                      "int8, int4."),
    engine: Optional[str] = typer.Option(None, "--engine", metavar="ENGINE",
                                         help="Whose verdict: native (the kit's default engine, no remote code) or "
                                              "remote-code (trust_remote_code: remote code that cannot run is a "
                                              "problem). Default: native where internlm-kit runs, remote-code in "
                                              "a --python without it."),
    fix: bool = typer.Option(False, "--fix", help="Repair what fails: one plan (packages resolved together, "
                                                  "folder re-downloads, steps by hand), asked once, undone if "
                                                  "the doctor still fails."),
    yes: bool = typer.Option(False, "--yes", "-y", help="With --fix: apply the plan without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --fix: show the plan and change nothing."),
) -> None:
    """Inspect an environment, the GPU stack and a model folder; print a fix for every problem.

    Exit code: 0 no problems, 1 problems found, 2 the doctor could not run. With --fix: 0 only when the
    doctor is clean afterwards.
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

    if normalize_dtype(dtype) not in ("auto", "bfloat16", "float16", "float32", "int8", "int4"):
        raise UsageError(f"--dtype {dtype} is not one of auto, bfloat16, float16, float32, int8, int4.",
                         "Pass --dtype float16 (GPUs before compute capability 8.0) or leave it out.")
    if engine not in (None, "native", "remote-code"):
        raise UsageError(f"--engine {engine} is not one of native, remote-code.",
                         "Leave it out (native, the engine internlm-kit chat uses), or pass --engine remote-code "
                         "to check for trust_remote_code.")

    if (yes or dry_run) and not fix:
        raise UsageError("--yes and --dry-run go with --fix.", "Add --fix, or leave them out.")
    if fix:
        if as_json:
            raise UsageError("--fix prints its plan and asks; it does not combine with --json.",
                             "Leave --json out, or run the doctor without --fix.")
        from setup_kit.fix import FixOptions
        from setup_kit.fix import fix as run_fix

        ids = [part.strip() for part in only.split(",") if part.strip()] if only else None
        options = FixOptions(python, model, profile, dtype, engine, yes, dry_run, verbose, ids)
        import sys

        raise typer.Exit(run_fix(options, Console(highlight=False, soft_wrap=not sys.stdout.isatty())))
    ids = [part.strip() for part in only.split(",") if part.strip()] if only else None
    report = diagnose(python=python, model=model, profile=profile, only=ids, dtype=dtype, engine=engine)
    if as_json:
        typer.echo(report.to_json())
    else:
        import sys

        # Into a file or a pipe, whole lines (rich would break them at 80 columns mid-path).
        render(report, Console(highlight=False, soft_wrap=not sys.stdout.isatty()), verbose=verbose)
    raise typer.Exit(report.exit_code)
