"""`internlm-kit install`: thin Typer layer over `setup_kit.install`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def command(
    profile: Optional[str] = typer.Option(None, "--profile", metavar="NAME",
                                          help="tutorial, current, cpu, or a path to a .toml profile. "
                                               "Default: chosen from the GPU and driver (no GPU: cpu)."),
    python: Optional[str] = typer.Option(None, "--python", metavar="PATH",
                                         help="Install into this interpreter's environment (default: this one)."),
    venv: Optional[Path] = typer.Option(None, "--venv", metavar="DIR",
                                        help="Create a venv at DIR with a Python the profile accepts, and install there."),
    installer: str = typer.Option("pip", "--installer", metavar="pip|uv", help="uv is used when asked for and on PATH."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve the whole profile and show what would change; "
                                                          "install nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (required without a terminal)."),
    rollback: bool = typer.Option(False, "--rollback",
                                  help="Restore the target to its latest snapshot (or SNAPSHOT) exactly, "
                                       "removing what was installed since."),
    snapshot: Optional[str] = typer.Argument(None, metavar="SNAPSHOT",
                                             help="With --rollback: the snapshot id or .json path (default: latest)."),
    list_profiles: bool = typer.Option(False, "--list-profiles", help="List the profiles and exit."),
    list_snapshots: bool = typer.Option(False, "--list-snapshots", help="List the snapshots of the target and exit."),
    torch_index_url: Optional[str] = typer.Option(None, "--torch-index-url", metavar="URL",
                                                  help="Take torch from this index instead of the profile's source "
                                                       "(a mirror of download.pytorch.org)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (messages go to stderr)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show pip's or uv's own output."),
) -> None:
    """Install a pinned environment profile into an environment, safely.

    Resolves the profile first (nothing changes when it cannot resolve), snapshots what is installed, installs torch first from the profile's source, then checks the result with the doctor's package checks.

    Exit code: 0 done, 1 failed (or cannot resolve), 2 bad arguments.
    """
    import json

    from rich.console import Console

    from setup_kit.errors import UsageError

    # soft_wrap: long paths and commands stay whole lines (copy-pasteable, greppable in logs).
    console = Console(stderr=as_json, highlight=False, soft_wrap=True)
    if installer not in ("pip", "uv"):
        raise UsageError(f"--installer {installer} is not pip or uv.", "Pass --installer pip or --installer uv.")
    if python and venv:
        raise UsageError("--python and --venv both name a target.", "Pass only one of them.")
    if list_profiles:
        _print_profiles(as_json, verbose)
        raise typer.Exit(0)
    if list_snapshots:
        _print_snapshots(python, venv, as_json)
        raise typer.Exit(0)

    from setup_kit import install as installing

    options = installing.InstallOptions(profile=profile, python=python, venv=venv, installer=installer,
                                        dry_run=dry_run, yes=yes, verbose=verbose, torch_index_url=torch_index_url,
                                        interactive=sys.stdin.isatty() and not as_json)
    if snapshot is not None and not rollback:
        raise UsageError(f"'{snapshot}' is only understood after --rollback.",
                         "Run `internlm-kit install --rollback SNAPSHOT`, or leave the argument out.")
    if rollback:
        if profile or dry_run:
            raise UsageError("--rollback restores a snapshot; it takes no --profile or --dry-run.",
                             "Run `internlm-kit install --rollback [SNAPSHOT] --python PATH` on its own.")
        outcome = installing.rollback(options, snapshot, console)
    else:
        outcome = installing.install(options, console)
    if as_json:
        typer.echo(json.dumps(outcome.to_dict(), indent=2, ensure_ascii=False))
    raise typer.Exit(outcome.exit_code)


def _print_profiles(as_json: bool, verbose: bool = False) -> None:
    import json

    from setup_kit.profiles import available_profiles

    profiles = available_profiles()
    rows = []
    for item in profiles.values():
        torch = item.pin("torch")
        transformers = item.pin("transformers")
        rows.append({"name": item.name, "python": item.python, "cuda": item.cuda or "cpu",
                     "torch": torch.version if torch else None,
                     "transformers": transformers.version if transformers else None,
                     "torch_source": item.torch_index_url or "PyPI", "summary": item.summary,
                     "pins": {p.name: p.version for p in item.pins}, "path": str(item.path)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    # The short facts in columns; each description on its own line below (in a sixth column a
    # narrow terminal wrapped it into 4-line cells).
    table = Table("profile", "Python", "CUDA", "torch", "transformers", box=None)
    for row in rows:
        table.add_row(row["name"], row["python"], row["cuda"], row["torch"] or "-", row["transformers"] or "-")
    console = Console(highlight=False)
    console.print(table)
    for row in rows:
        console.print(f"  {row['name']}: {row['summary']}", soft_wrap=True, markup=False)
    if not verbose:
        console.print("(-v: every pin and why it is there)")
        return
    for item in profiles.values():
        console.print(f"\n[bold]{item.name}[/] ({item.path})")
        for pin in item.pins:
            console.print(f"  {pin.name}=={pin.version}: {pin.why}", soft_wrap=True)


def _print_snapshots(python: Optional[str], venv: Optional[Path], as_json: bool) -> None:
    import json

    from setup_kit.install.snapshot import list_snapshots, snapshots_dir
    from setup_kit.probe import resolve_python

    target = resolve_python(str(venv / "bin" / "python") if venv else python)
    found = list_snapshots(target)
    if as_json:
        typer.echo(json.dumps([{"id": s.id, "created": s.created, "python": s.python, "reason": s.reason,
                                "distributions": len(s.distributions), "path": str(s.path)} for s in found], indent=2))
        return
    if not found:
        typer.echo(f"No snapshots of {target} in {snapshots_dir()}.")
    for s in found:
        typer.echo(f"{s.id}  {s.created}  {len(s.distributions):>4} distributions  {s.reason}")
