"""`internlm-kit doctor --fix`: the failing checks' fixers become one plan, applied through install's
machinery (resolve first, snapshot, install, verify), then the doctor runs again.

Packages to add, upgrade or downgrade go into ONE resolution (`pip install --dry-run --report`), with
the installed torch pinned unless torch itself is the problem; what pip resolved is what gets
installed. Folder repairs go through `internlm-kit download` with the repo the folder came from.
What cannot be automated is printed as steps. A failed step or a doctor that still fails puts the
environment back exactly as the snapshot recorded it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from setup_kit.errors import KitError, UsageError

# Modules whose import proves a package works (pip check cannot see a missing name in a dependency).
IMPORT_NAMES = {"protobuf": "google.protobuf", "huggingface-hub": "huggingface_hub"}
IMPORT_SCRIPT = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(failed))
"""


@dataclass
class FixPlan:
    requirements: dict[str, str] = field(default_factory=dict)  # requirement -> the check that wants it
    keep: list[str] = field(default_factory=list)  # torch==installed: kept through the resolution
    downloads: list[tuple[str, str, str]] = field(default_factory=list)  # (check id, repo, folder)
    steps: list[tuple[str, str]] = field(default_factory=list)  # (check id, what to do by hand)
    changes: list = field(default_factory=list)  # resolve.Change, what the resolution says will move
    conflicts: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)  # failures the checks' summaries do not show

    @property
    def empty(self) -> bool:
        return not (self.changes or self.downloads or self.steps)


@dataclass
class FixOptions:
    python: str | None = None
    model: Path | None = None
    profile: str | None = None
    dtype: str = "auto"
    engine: str = "native"
    yes: bool = False
    dry_run: bool = False
    verbose: bool = False
    only: list[str] | None = None  # fix only what these checks find


def failing(report) -> list:
    return [c for c in report.checks if c.status == "fail"]


def import_failures(python: str, env) -> dict[str, str]:
    """Import each installed required package (torch aside: the doctor's torch check covers it)."""
    from setup_kit.checks.packages import REQUIRED

    return run_imports(python, import_modules(env))


def import_modules(env) -> dict[str, str]:
    """module -> distribution, for the installed required packages; transformers' modeling_utils is
    what imports accelerate (a broken accelerate breaks every model load, not `import transformers`)."""
    from setup_kit.checks.packages import REQUIRED

    modules = {IMPORT_NAMES.get(n, n): n for n in REQUIRED if n != "torch" and env.has(n)}
    if "transformers" in modules and env.has("torch"):
        modules["transformers.modeling_utils"] = "transformers"
    return modules


def run_imports(python: str, modules, overlay: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=overlay) if overlay else None
    done = subprocess.run([python, "-c", IMPORT_SCRIPT, *modules], capture_output=True, text=True, timeout=300,
                          env=env)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"(import check)": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"}


def engine_for(python: str, env, engine: str | None) -> str:
    """The engine the doctor assumes for this target (its own rule, where the doctor has one)."""
    try:
        from setup_kit.doctor import assumed_engine
    except ImportError:
        return engine or "native"
    return assumed_engine(python, env, engine)[0]


def facts(options: FixOptions):
    """The target's packages, as the doctor's package checks read them."""
    from setup_kit import probe
    from setup_kit.checks.base import Context
    from setup_kit.doctor import choose_profile

    python = probe.resolve_python(options.python)
    ctx = Context(python=python, env=probe.probe_environment(python))
    chosen = engine_for(python, ctx.env, options.engine)
    ctx.engine = "remote-code" if chosen == "remote-code" else None  # as the doctor's checks read it
    ctx.profile, ctx.profile_reason, ctx.profile_explicit, ctx.fix_profile = choose_profile(
        ctx.env, options.profile, False)
    return ctx


def rehearsal_problem(options: FixOptions, python: str) -> str | None:
    """With --model: the engine's own path on a miniature twin of the folder (the rehearsal), the
    final proof that the fixed environment runs the model; None when it passes."""
    if options.model is None or options.only:  # --only: the user narrowed what is checked and fixed
        return None
    from setup_kit.checks import all_checks

    if any("rehearsal" in c.needs for c in all_checks()):
        return None  # the doctor's own rehearsal checks ran it, in the doctor run just made
    from setup_kit import probe
    from setup_kit.probe.rehearsal import rehearse

    engine = engine_for(python, probe.probe_environment(python), options.engine)
    outcome = rehearse(python, options.model, engine, dtype=options.dtype)
    if outcome.passed:
        return None
    where = f" at {outcome.where}" if outcome.where else ""
    return (f"the {engine} rehearsal fails at {outcome.stage or 'its start'}: "
            f"{outcome.exception_type or 'error'}: {outcome.message}{where}")


def pip_requirements(fix_text: str | None) -> dict:
    """A check without a fixer of its own (a known-issue rule, the rehearsal) whose fix is plain
    `pip install REQ...` commands: those requirements join the one resolution. A command with options
    (another index, --force-reinstall) stays a step by hand."""
    import re
    import shlex

    from packaging.requirements import InvalidRequirement, Requirement

    requirements = []
    for match in re.finditer(r"-m pip install ([^&()#\n]+)", fix_text or ""):
        try:
            words = shlex.split(match.group(1))
        except ValueError:
            return {}
        if not words or any(w.startswith("-") for w in words):
            return {}
        try:
            requirements += [str(Requirement(w)) for w in words]
        except InvalidRequirement:
            return {}
    return {"requirements": requirements} if requirements else {}


def make_plan(report, ctx, broken: dict[str, str]) -> FixPlan:
    """Walk the failing checks; each fixer adds to the one plan, the rest become steps."""
    from setup_kit.checks.fixes import FIXERS

    plan = FixPlan()
    failed = failing(report)
    # A failed rehearsal whose fix installs packages came from the real exception (a known-issue rule
    # matched on it); the import check's fix for the same code guesses from a version rule and can
    # name another stack (an accelerate that breaks the import is not transformers' fault).
    rehearsal_fixes = any(r.id.startswith("model.rehearsal") and pip_requirements(r.fix) for r in failed)
    for result in failed:
        if rehearsal_fixes and result.id == "model.remote-code-imports":
            plan.why.append("model.remote-code-imports fails too; the rehearsal's fix, found from the real exception, covers it")
            continue
        repair = FIXERS[result.id](ctx, result) if result.id in FIXERS else pip_requirements(result.fix)
        for requirement in repair.get("requirements", []):
            plan.requirements.setdefault(requirement, result.id)
        if "download" in repair:
            plan.downloads.append((result.id, *repair["download"]))
        if not repair.get("requirements") and "download" not in repair:
            plan.steps.append((result.id, result.fix or result.summary))
    from packaging.requirements import Requirement

    if broken:
        modules = import_modules(ctx.env)
        named = {Requirement(r).name.lower() for r in plan.requirements}
        # A check already names a version of a distribution whose import fails (accelerate, through
        # which transformers fails too): that one, not a second version found by trying releases; the
        # doctor run after the install proves it.
        if any(modules.get(m, m).lower() in named for m in broken):
            broken = {}
    if broken:
        found = prove_older(ctx, broken)
        if found:
            plan.requirements.setdefault(found, "packages.import")
            plan.why += [f"`import {name}` fails: {problem}; {found} imports (tried before anything changes)"
                         for name, problem in broken.items()]
        else:
            plan.steps += [("packages.import", f"`import {name}` fails: {problem}") for name, problem in broken.items()]
    wanted = {Requirement(r).name.lower() for r in plan.requirements}
    torch = ctx.env.version("torch")
    if torch and plan.requirements and "torch" not in wanted:
        plan.keep.append(f"torch=={torch}")
    return plan


def older_versions(target, name: str, installed: str) -> list[str]:
    """The releases of `name` older than the installed one, oldest first (pip's own index query)."""
    from packaging.version import InvalidVersion, Version

    done = subprocess.run(target.pip_command("index", "versions", name), capture_output=True, text=True,
                          timeout=120)
    line = next((l for l in done.stdout.splitlines() if l.startswith("Available versions:")), "")
    versions = []
    for text in line.partition(":")[2].split(","):
        try:
            version = Version(text.strip())
        except InvalidVersion:
            continue
        if not version.is_prerelease and version < Version(installed):
            versions.append(version)
    return [str(v) for v in sorted(versions)]


def prove_older(ctx, broken: dict[str, str]) -> str | None:
    """A release that imports where the installed one does not, proved before anything is touched:
    each candidate is installed (no dependencies) into a scratch folder laid over the target's
    packages, and every failing module imported through it. Bisects to the newest that works."""
    import shutil

    from setup_kit.install.target import inspect_target

    modules = import_modules(ctx.env)
    # The failing distribution whose own module fails: transformers fails through accelerate.
    suspects = [modules[m] for m in broken if m in modules and modules[m] != "transformers"] or \
        [modules[m] for m in broken if m in modules]
    if not suspects:
        return None
    name = suspects[0]
    target = inspect_target(ctx.python)
    candidates = older_versions(target, name, ctx.env.version(name))

    def works(version: str) -> bool:
        scratch = tempfile.mkdtemp(prefix="internlm-kit-prove-")
        try:
            done = subprocess.run(target.pip_command("install", "--no-deps", "--target", scratch,
                                                     f"{name}=={version}"), capture_output=True, timeout=600)
            return done.returncode == 0 and not run_imports(ctx.python, list(broken), overlay=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # Gallop down from the newest (1, 2, 4, ... releases back) to one that works, then bisect between
    # it and the last that failed: a few tries, and very old releases broken for other reasons are
    # never what decides.
    newest_first = candidates[::-1]
    if not newest_first:
        return None
    last, failed, step = len(newest_first) - 1, -1, 1
    while True:
        index = min(failed + step, last)
        if works(newest_first[index]):
            found = index
            break
        if index == last:
            return None
        failed, step = index, step * 2
    low, high = failed + 1, found - 1  # newest_first[failed] fails, newest_first[found] works
    while low <= high:
        middle = (low + high) // 2
        if works(newest_first[middle]):
            found, high = middle, middle - 1
        else:
            low = middle + 1
    return f"{name}=={newest_first[found]}"


def resolve(plan: FixPlan, target, before) -> None:
    """One resolution of every requirement together; raises KitError (nothing changed) when pip cannot."""
    from setup_kit.install.plan import show_command
    from setup_kit.install.resolve import changes_from_report, predicted_conflicts, run_captured

    if not plan.requirements:
        return
    with tempfile.TemporaryDirectory(prefix="internlm-kit-fix-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        argv = target.pip_command("install", "--dry-run", "--use-feature=fast-deps", "--report", report_path,
                                  *plan.requirements, *plan.keep)
        output, code = run_captured(argv, None, 900)
        if code != 0:
            errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR")] or \
                output.strip().splitlines()[-3:]
            raise KitError(f"The fix cannot be installed into {target.python}: pip could not resolve "
                           f"{', '.join(plan.requirements)} ({' '.join(errors)[:600]}). Nothing was changed.",
                           f"Check that the package index is reachable (pip honours PIP_INDEX_URL and "
                           f"HTTPS_PROXY), then run `internlm-kit doctor --fix` again; to see pip's own "
                           f"output: `{show_command(argv)}`.")
        with open(report_path, encoding="utf-8") as handle:
            plan.changes = [c for c in changes_from_report(json.load(handle), before) if c.kind != "reinstall"]
    plan.conflicts = predicted_conflicts(before, plan.changes, target.python)


def show_plan(plan: FixPlan, console) -> None:
    for problem in plan.why:
        console.print(f"  because {escape(problem)}", highlight=False, soft_wrap=True)
    if plan.changes:
        console.print("Packages, resolved together in one resolution"
                      + (f" ({', '.join(plan.keep)} kept)" if plan.keep else "") + ":")
        for change in plan.changes:
            console.print(f"  {escape(change.describe())}", highlight=False)
        for line in plan.conflicts:
            console.print(f"  [yellow]conflict:[/] {escape(line)}", highlight=False)
    for check_id, repo, folder in plan.downloads:
        console.print(f"Folder ({check_id}): internlm-kit download {escape(repo)} --local-dir {escape(folder)}",
                      highlight=False)
    if plan.steps:
        console.print("By hand (the kit cannot do these):")
        for check_id, text in plan.steps:
            console.print(f"  [{escape(check_id)}] {escape(text)}", highlight=False, soft_wrap=True)


def rerun(options: FixOptions):
    from setup_kit.doctor import diagnose

    return diagnose(python=options.python, model=options.model, profile=options.profile, dtype=options.dtype,
                    engine=options.engine, only=options.only)


def fix(options: FixOptions, console) -> int:
    """The whole `doctor --fix`; returns the exit code (0 only when the re-run is clean)."""
    from setup_kit.install.snapshot import list_installed
    from setup_kit.install.target import inspect_target
    from setup_kit.report import render

    with console.status("Running the doctor"):
        report = rerun(options)
        ctx = facts(options)
        broken = import_failures(ctx.python, ctx.env)  # pip check cannot see these; importing can
    rehearsal = None
    if report.ok and not broken:
        with console.status("Rehearsing the model on a miniature twin"):
            rehearsal = rehearsal_problem(options, ctx.python)
        if rehearsal is None:
            render(report, console, verbose=options.verbose)
            console.print("[green]Nothing to fix: the doctor is clean and the packages import.[/]")
            return 0
    with console.status("Working out the smallest change (candidates are tried before anything changes)"):
        plan = make_plan(report, ctx, broken)
        if rehearsal:
            plan.steps.append(("rehearsal", rehearsal))
        target = inspect_target(ctx.python)
        before = list_installed(target)
        resolve(plan, target, before)
    render(report, console, verbose=options.verbose)
    console.print("[bold]The fix:[/]")
    show_plan(plan, console)
    automated = bool(plan.changes or plan.downloads)
    if not automated:
        console.print("[yellow]Nothing here can be repaired automatically: do the steps above, then run the "
                      "doctor again.[/]")
        return 1
    if options.dry_run:
        console.print("Dry run: nothing was changed.")
        return 1
    if not options.yes:
        if not sys.stdin.isatty():
            raise UsageError("doctor --fix changes the environment and asks first, but there is no terminal to "
                             "ask on (stdin is not a TTY).",
                             "Pass --yes to go ahead without asking (see the plan first with --dry-run).")
        import typer

        if not typer.confirm("Apply this fix?", default=False):
            raise KitError("Cancelled: nothing was changed.", None)
    return apply(plan, target, before, options, console)


def apply(plan: FixPlan, target, before, options: FixOptions, console) -> int:
    from setup_kit.install.execute import failure_tail, log_path, run_steps
    from setup_kit.install.flow import InstallOutcome, rollback_command
    from setup_kit.install.plan import show_command
    from setup_kit.install.snapshot import save_snapshot
    from setup_kit.report import render

    snapshot = save_snapshot(target, before, "before doctor --fix", "doctor-fix") if plan.changes else None
    if snapshot:
        console.print(f"Snapshot of the {len(before.distributions)} installed distributions: {snapshot.id}",
                      highlight=False)
    commands = []
    if plan.changes:  # exactly what the resolution chose, nothing re-resolved differently
        pins = [f"{c.name}=={c.new}" for c in plan.changes if c.new]
        commands.append(target.pip_command("install", *pins, *plan.keep))
    commands += [[sys.executable, "-m", "setup_kit", "download", repo, "--local-dir", folder]
                 for _, repo, folder in plan.downloads]
    log = log_path("doctor-fix")
    results = run_steps(commands, console, options.verbose, log, "Fixing")
    failed = next((r for r in results if r.code != 0), None)
    if failed is not None:
        kept = restore(target, snapshot, console, options)
        raise KitError(f"The fix failed at `{show_command(failed.argv)}` (exit {failed.code}); {kept}. "
                       f"Log: {log}\n    {failure_tail(failed)}",
                       "Fix the cause above and run `internlm-kit doctor --fix` again.")
    with console.status("Running the doctor again"):
        after = rerun(options)
    render(after, console, verbose=options.verbose)
    from setup_kit import probe

    broken = import_failures(target.python, probe.probe_environment(target.python))
    by_hand = {check_id for check_id, _ in plan.steps}
    still = [c.id for c in failing(after) if c.id not in by_hand] + [f"import {n}" for n in broken]
    if not still and not by_hand and (problem := rehearsal_problem(options, target.python)):
        still.append(problem)
    if still:
        kept = restore(target, snapshot, console, options)
        console.print(f"[red]After the fix the doctor still fails ({', '.join(still)}): {kept}.[/]",
                      highlight=False)
        return 1
    if not after.ok:
        console.print("[yellow]The automated part worked; the doctor is clean once the steps by hand are done."
                      "[/]")
        return 1
    undo = f" (undo: {rollback_command(target, snapshot.id)})" if snapshot else ""
    console.print(f"[green]Fixed: the doctor is clean on {escape(target.python)}.[/]{escape(undo)}",
                  highlight=False)
    _ = InstallOutcome  # install's outcome type is what restore() records into
    return 0


def restore(target, snapshot, console, options: FixOptions) -> str:
    """Put the packages back exactly as the snapshot recorded them; says what was kept."""
    from setup_kit.install.flow import InstallOutcome, _restore
    from setup_kit.install.snapshot import list_installed, restore_plan

    if snapshot is None:
        return "no package was changed"
    now = list_installed(target)
    if restore_plan(snapshot, now).empty:
        return "nothing was changed"
    console.print(f"[yellow]Putting {escape(target.python)} back as snapshot {snapshot.id} recorded it.[/]",
                  highlight=False)
    _restore(target, snapshot, now, console, options.verbose, InstallOutcome("fix", python=target.python))
    return f"the environment was put back exactly as it was (snapshot {snapshot.id})"
