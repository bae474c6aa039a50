"""The install and rollback flows: each step's output on the console, the outcome as data."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from setup_kit.errors import KitError, UsageError
from setup_kit.install.plan import make_plan, show_command
from setup_kit.install.target import Target, inspect_target


@dataclass
class InstallOptions:
    profile: str | None = None
    python: str | None = None
    venv: Path | None = None
    installer: str = "pip"
    dry_run: bool = False
    yes: bool = False
    verbose: bool = False
    torch_index_url: str | None = None
    interactive: bool = False  # a person at a terminal can answer the confirmation


@dataclass
class InstallOutcome:
    action: str  # install | dry-run | rollback
    profile: str | None = None
    reason: str = ""
    python: str = ""
    python_version: str = ""
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resolution: dict | None = None
    snapshot: str | None = None
    changed: bool = False
    verification: dict | None = None
    log: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict:
        return {"schema": 1, "ok": self.exit_code == 0, **self.__dict__}


def require_consent(options: InstallOptions) -> None:
    if not options.dry_run and not options.yes and not options.interactive:
        raise UsageError("install changes an environment and asks first, but there is no terminal to ask on "
                         "(stdin is not a TTY).",
                         "Pass --yes to go ahead without asking (see the plan first with --dry-run).")


def confirm(options: InstallOptions, question: str) -> None:
    if options.yes:
        return
    import typer

    if not typer.confirm(question, default=False):
        raise KitError("Cancelled: nothing was changed.", None)


def pick_profile(options: InstallOptions):
    from setup_kit.profiles import available_profiles, load_profile

    if options.profile:
        return load_profile(options.profile), "named with --profile"
    from setup_kit.install.choose import choose_profile
    from setup_kit.probe import probe_gpu

    return choose_profile(probe_gpu(), available_profiles())


def python_refusal(profile, target: Target) -> UsageError:
    return UsageError(f"Profile {profile.name} needs Python {profile.python}, but {target.python} is Python "
                      f"{target.version}.",
                      f"Let the kit create an environment with a Python it accepts: "
                      f"`internlm-kit install --profile {profile.name} --venv ~/envs/internlm` (or pass --python "
                      f"with a Python {profile.python} interpreter).")


def open_target(options: InstallOptions, profile, console, scratch: list[Path]) -> Target:
    """The target interpreter: --python, the running one, or a venv at --venv (made if needed)."""
    from packaging.specifiers import SpecifierSet

    from setup_kit.install.pythons import create_venv, pick_python

    if options.venv is None:
        target = inspect_target(options.python)
    else:
        directory = options.venv.expanduser().absolute()
        existing = directory / "bin" / "python"
        if existing.exists():
            target = inspect_target(str(existing))
            target.notes.append(f"{directory} is already a venv: installing into it")
        elif directory.exists() and any(directory.iterdir()):
            raise UsageError(f"--venv {directory} exists and is not an empty folder or a venv.",
                             "Pass a new folder (it will be created) or an existing venv.")
        else:
            chosen = pick_python(profile.python)
            if options.dry_run:
                # A dry run changes nothing: resolve in a throwaway venv made with the same Python.
                directory = Path(tempfile.mkdtemp(prefix="internlm-kit-dry-run-")) / "venv"
                scratch.append(directory.parent)
            elif not directory.exists():
                scratch.append(directory)  # removed again if the install never starts
            console.print(f"Creating a venv at {escape(str(directory))} with Python {chosen.version} "
                          f"({escape(chosen.path)}, from {chosen.source})", highlight=False)
            target = inspect_target(create_venv(directory, chosen, options.installer))
            target.created = True
    if profile.python and not SpecifierSet(profile.python).contains(target.version, prereleases=True):
        raise python_refusal(profile, target)
    return target


def describe_size(size: int | None) -> str:
    """'about 2.4 GB' for what an install fetches (pip may reuse some of it from its cache)."""
    if size is None:
        return "size unknown (the package index did not say)"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"about {size / scale:.1f} {unit} (less where pip's cache already has a file)"
    return f"{size} bytes"


def print_resolution(console, resolution, before_count: int) -> None:
    from collections import Counter

    counts = Counter(c.kind for c in resolution.changes)
    if not resolution.changes:
        console.print(f"Resolved in {resolution.seconds:.1f}s: nothing to change, every pin is already installed.")
    else:
        plural = {"install": "installs", "upgrade": "upgrades", "downgrade": "downgrades",
                  "reinstall": "reinstalls", "remove": "removals"}
        summary = ", ".join(f"{n} {kind if n == 1 else plural[kind]}" for kind, n in counts.items())
        console.print(f"Resolved in {resolution.seconds:.1f}s: {summary} "
                      f"({before_count} distributions installed now):", highlight=False)
        order = {"downgrade": 0, "upgrade": 1, "reinstall": 2, "install": 3, "remove": 4}
        style = {"downgrade": "yellow", "remove": "red", "upgrade": "cyan", "install": "green"}
        for change in sorted(resolution.changes, key=lambda c: (order[c.kind], c.name.lower())):
            console.print(f"  [{style.get(change.kind, 'white')}]{escape(change.describe())}[/]", highlight=False)
    if resolution.changes:
        console.print(f"Download: {describe_size(resolution.download_bytes)}", highlight=False)
    for line in resolution.conflicts:
        console.print(f"  [bold yellow]conflict:[/] {escape(line)}", highlight=False)
    if resolution.conflicts:
        console.print("  [yellow]pip installs these anyway; the check after installing will fail on them.[/]")


def install(options: InstallOptions, console) -> InstallOutcome:
    scratch: list[Path] = []  # a venv this run created, removed again unless the install started
    outcomes: list[InstallOutcome] = []
    try:
        return _install(options, console, scratch, outcomes)
    finally:
        started = bool(outcomes and outcomes[0].changed)
        for path in scratch:
            if not started or "internlm-kit-dry-run-" in str(path):
                shutil.rmtree(path, ignore_errors=True)


def _install(options: InstallOptions, console, scratch: list[Path], outcomes: list) -> InstallOutcome:
    from setup_kit.install.resolve import resolve
    from setup_kit.install.snapshot import list_installed

    require_consent(options)
    profile, reason = pick_profile(options)
    console.print(f"Profile: [bold]{escape(profile.name)}[/] ({escape(reason)})", highlight=False)
    target = open_target(options, profile, console, scratch)
    outcome = InstallOutcome("dry-run" if options.dry_run else "install", profile.name, reason, target.python,
                             target.version)
    outcomes.append(outcome)
    before = list_installed(target)
    plan = make_plan(profile, target, options.installer, options.torch_index_url, options.dry_run)
    outcome.notes = target.notes + plan.notes
    outcome.commands = [show_command(c) for c in plan.commands()]
    console.print(f"Target: {escape(target.python)} (Python {target.version})", highlight=False)
    for note in outcome.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}", highlight=False)
    console.print("Plan:")
    for command in outcome.commands:
        console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)
    with console.status(f"Resolving profile {profile.name} for Python {target.version} (installs nothing)"):
        on_line = (lambda line: console.print(f"    {line}", markup=False, highlight=False)) if options.verbose else None
        resolution = resolve(plan, before, on_line)
    outcome.resolution = resolution.to_dict()
    print_resolution(console, resolution, len(before.distributions))
    if options.dry_run:
        console.print("Dry run: nothing was installed.")
        return outcome
    if resolution.changes:
        confirm(options, f"Install profile {profile.name} into {target.python}?")
        run_install(plan, before, outcome, console, options)
    return verify_outcome(outcome, profile, target, console, options)


def run_install(plan, before, outcome: InstallOutcome, console, options: InstallOptions) -> None:
    from setup_kit.install.execute import failure_tail, log_path, run_steps
    from setup_kit.install.snapshot import list_installed, restore_plan, save_snapshot

    target = plan.target
    snapshot = save_snapshot(target, before, f"before install --profile {plan.profile.name}", plan.profile.name)
    outcome.snapshot = snapshot.id
    console.print(f"Snapshot of the {len(before.distributions)} installed distributions: {snapshot.id} "
                  f"({escape(str(snapshot.path))})", highlight=False)
    log = log_path(f"install-{plan.profile.name}")
    outcome.log = str(log)
    outcome.changed = True
    try:
        results = run_steps(plan.commands(), console, options.verbose, log, "Installing")
    except KeyboardInterrupt:
        raise KitError(f"Interrupted while installing profile {plan.profile.name}: the environment may be "
                       f"partly changed. Log: {log}",
                       f"Undo it with `{rollback_command(target, snapshot.id)}`, or run the install again.",
                       exit_code=130) from None
    failed = next((r for r in results if r.code != 0), None)
    if failed is None:
        return
    what = (f"The install of profile {plan.profile.name} failed at `{show_command(failed.argv)}` "
            f"(exit {failed.code})")
    # Never leave the target half-changed: an earlier step (torch) may have gone through.
    now = list_installed(target)
    if restore_plan(snapshot, now).empty:
        kept = "nothing was changed"
    else:
        console.print(f"[yellow]The install failed: putting {escape(target.python)} back as snapshot "
                      f"{snapshot.id} recorded it.[/]", highlight=False)
        try:
            _restore(target, snapshot, now, console, options.verbose, outcome)
            kept = f"the environment was put back exactly as it was (snapshot {snapshot.id})"
            outcome.changed = False
        except KitError as exc:
            raise KitError(f"{what}, and putting the environment back failed too: {exc.message}",
                           exc.fix) from None
    raise KitError(f"{what}; {kept}. Full log: {log}\n    {failure_tail(failed)}",
                   "Fix the cause above and run the install again.")


def rollback_command(target: Target, snapshot_id: str) -> str:
    return f"internlm-kit install --rollback {snapshot_id} --python {show_command([target.python])}"


def verify_outcome(outcome: InstallOutcome, profile, target: Target, console, options: InstallOptions) -> InstallOutcome:
    from setup_kit.install.verify import verify
    from setup_kit.report import render

    with console.status("Checking the result with the doctor's package checks"):
        report = verify(target.python, profile)
    outcome.verification = report.to_dict()
    render(report, console, verbose=options.verbose)
    if report.ok:
        done = "Installed" if outcome.changed else "Already installed:"
        console.print(f"[green]{done} profile {escape(profile.name)} in {escape(target.python)}.[/]", highlight=False)
        if outcome.snapshot:
            console.print(f"  undo: {escape(rollback_command(target, outcome.snapshot))}", highlight=False)
        return outcome
    outcome.exit_code = 1
    undo = (f" Undo the install with `{rollback_command(target, outcome.snapshot)}`." if outcome.snapshot else "")
    console.print(f"[red]The install finished, but the doctor's package checks fail on {escape(target.python)} "
                  f"(see above).[/]{escape(undo)}", highlight=False)
    return outcome


def rollback(options: InstallOptions, snapshot_name: str | None, console) -> InstallOutcome:
    """Put the target back exactly as a snapshot recorded it."""
    from setup_kit.install.snapshot import find_snapshot, list_installed, restore_plan

    python = str(options.venv.expanduser() / "bin" / "python") if options.venv else options.python
    target = inspect_target(python)
    snapshot = find_snapshot(snapshot_name, target.python)  # "no snapshot" before asking for --yes
    require_consent(options)
    outcome = InstallOutcome("rollback", python=target.python, python_version=target.version, snapshot=snapshot.id,
                             reason=snapshot.reason)
    console.print(f"Rolling {escape(target.python)} back to snapshot {snapshot.id} "
                  f"(taken {snapshot.created}, {escape(snapshot.reason)})", highlight=False)
    now = list_installed(target)
    if restore_plan(snapshot, now).empty:
        console.print(f"Nothing to do: the environment already matches snapshot {snapshot.id}.")
        return outcome
    _restore(target, snapshot, now, console, options.verbose, outcome, options=options)
    return outcome


def _restore(target: Target, snapshot, now, console, verbose: bool, outcome: InstallOutcome, *,
             options: InstallOptions | None = None) -> None:
    """Reinstall and remove until the target matches the snapshot exactly, or raise KitError; `now`
    is the target's listing the caller already took.

    With `options`, the changes are shown and confirmed first (`--rollback`); without, it runs at once
    (undoing a failed install, which the user already agreed to change)."""
    from setup_kit.install.execute import failure_tail, log_path, run_steps
    from setup_kit.install.plan import index_problem
    from setup_kit.install.snapshot import (list_installed, restore_commands, restore_plan, save_snapshot,
                                            torch_build_index)

    plan = restore_plan(snapshot, now)
    index = torch_build_index(plan)
    if index and (problem := index_problem(index)):
        outcome.notes.append(f"{index} cannot be reached ({problem}): old torch builds come from your "
                             "configured indexes")
        index = None
    commands = restore_commands(target, plan, index)
    for name in plan.remove:
        console.print(f"  [red]- {escape(name)} {now.distributions[_key(name)].version}[/] (added since)", highlight=False)
    for entry in plan.reinstall:
        current = now.distributions.get(_key(entry["name"]))
        was = f"{current.version} -> " if current else ""
        console.print(f"  [cyan]= {escape(entry['name'])} {was}{escape(entry['version'])}[/]", highlight=False)
    console.print(f"  ({plan.unchanged} distributions unchanged)")
    undo = None
    if options is not None:
        outcome.commands = [show_command(c) for c in commands]
        confirm(options, f"Roll {target.python} back to {snapshot.id}?")
        undo = save_snapshot(target, now, f"before rollback to {snapshot.id}", "before-rollback")
        outcome.notes.append(f"the state before this rollback is snapshot {undo.id}")
        outcome.changed = True
    log = log_path("rollback")
    if undo is not None:  # --rollback's own outcome; an install's keeps its install log
        outcome.log = str(log)
    results = run_steps(commands, console, verbose, log, "Restoring")
    failed = next((r for r in results if r.code != 0), None)
    left = restore_plan(snapshot, list_installed(target))
    if failed is not None or not left.empty:
        why = (f"`{show_command(failed.argv)}` failed (exit {failed.code}):\n    {failure_tail(failed)}" if failed
               else f"still different: {', '.join(left.remove + [e['name'] for e in left.reinstall])}")
        raise KitError(f"The rollback to {snapshot.id} did not complete: {why}. Log: {log}",
                       f"Fix the cause and run `{rollback_command(target, snapshot.id)}` again "
                       f"(it only redoes what still differs).")
    tail = f" (undo: {escape(rollback_command(target, undo.id))})" if undo else ""
    console.print(f"[green]Restored {escape(target.python)} to snapshot {snapshot.id} exactly.[/]{tail}",
                  highlight=False)


def _key(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))
