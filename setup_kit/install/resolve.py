"""Resolve a plan without installing anything (`pip install --dry-run --report`, or uv's
`--dry-run`), and say what would change and what already-installed package it would break."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

from setup_kit.errors import KitError
from setup_kit.install.plan import Plan, show_command
from setup_kit.install.snapshot import Environment

RESOLVE_TIMEOUT = 900
UV_LINE = re.compile(r"^\s*([+-])\s+([A-Za-z0-9_.\-\[\],]+)==(\S+)")


@dataclass
class Change:
    name: str
    kind: str  # install | upgrade | downgrade | reinstall | remove
    old: str | None
    new: str | None
    requires: list[str] = field(default_factory=list)
    url: str = ""  # where pip would fetch it from (pip's report); "" when unknown

    def describe(self) -> str:
        if self.kind == "install":
            return f"+ {self.name} {self.new}"
        if self.kind == "remove":
            return f"- {self.name} {self.old}"
        arrow = {"upgrade": "↑", "downgrade": "↓"}.get(self.kind, "=")
        return f"{arrow} {self.name} {self.old} -> {self.new}"


@dataclass
class Resolution:
    changes: list[Change]
    conflicts: list[str]  # requirements of installed packages the result would break
    seconds: float
    output: str = ""  # pip's own output, shown under -v
    download_bytes: int | None = None  # what the install would fetch; None when unknown (uv, no answer)

    def to_dict(self) -> dict:
        return {"changes": [asdict(c) for c in self.changes], "conflicts": self.conflicts,
                "seconds": round(self.seconds, 2), "download_bytes": self.download_bytes}


def classify(name: str, old: str | None, new: str) -> str:
    from packaging.version import Version

    if old is None:
        return "install"
    if Version(new) > Version(old):
        return "upgrade"
    if Version(new) < Version(old):
        return "downgrade"
    return "reinstall"


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def changes_from_report(report: dict, before: Environment) -> list[Change]:
    changes = []
    for item in report.get("install", []):
        meta = item["metadata"]
        current = before.distributions.get(_canonical(meta["name"]))
        old = current.version if current else None
        changes.append(Change(meta["name"], classify(meta["name"], old, meta["version"]), old, meta["version"],
                              list(meta.get("requires_dist") or []),
                              str((item.get("download_info") or {}).get("url") or "")))
    return changes


def download_size(urls: list[str], timeout: float = 10.0) -> int | None:
    """The bytes behind the archive URLs pip would fetch (HEAD's Content-Length, file size for file:
    URLs), asked in parallel; None when any size cannot be learnt, rather than a figure too small."""
    import urllib.parse
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def size(url: str) -> int | None:
        if url.startswith("file:"):
            try:
                return os.path.getsize(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
            except OSError:
                return None
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "internlm-kit"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                length = answer.headers.get("Content-Length")
                return int(length) if length and length.isdigit() else None
        except (OSError, ValueError):
            return None

    if not urls or any(not u for u in urls):
        return None if urls else 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = list(pool.map(size, urls))
    return None if any(s is None for s in sizes) else sum(sizes)


def changes_from_uv(output: str, before: Environment) -> list[Change]:
    """uv's dry run prints ` + name==version` / ` - name==version` lines."""
    added, removed = {}, {}
    for line in output.splitlines():
        if match := UV_LINE.match(line):
            sign, name, version = match.groups()
            (added if sign == "+" else removed)[_canonical(name)] = (name, version)
    changes = []
    for key, (name, version) in added.items():
        current = before.distributions.get(key)
        old = current.version if current else None
        changes.append(Change(name, classify(name, old, version), old, version,
                              list(current.requires) if current and old == version else []))
    for key, (name, version) in removed.items():
        if key not in added:
            changes.append(Change(name, "remove", version, None))
    return changes


def predicted_conflicts(before: Environment, changes: list[Change], python: str) -> list[str]:
    """The doctor's own dependency check, run on the set the install would leave behind;
    only problems the install would introduce are returned."""
    from packaging.requirements import Requirement

    from setup_kit.checks.base import Context
    from setup_kit.checks.packages import dependency_problems
    from setup_kit.probe import Distribution, EnvironmentFacts

    def facts(dists: dict[str, Distribution]) -> Context:
        env = EnvironmentFacts({"executable": python, "version": ""}, {}, dict(before.markers), dists, {})
        return Context(python=python, env=env)

    old = {k: Distribution(d.name, d.version, d.requires) for k, d in before.distributions.items()}
    new = dict(old)
    for change in changes:
        if change.kind == "remove":
            new.pop(_canonical(change.name), None)
        elif change.new is not None:
            known = change.requires or (list(old[_canonical(change.name)].requires)
                                        if _canonical(change.name) in old and change.kind == "reinstall" else [])
            new[_canonical(change.name)] = Distribution(change.name, change.new, tuple(known))
    existing = set(dependency_problems(facts(old)))
    lines = []
    for name, version, requirement, have in dependency_problems(facts(new)):
        if (name, version, requirement, have) in existing:
            continue
        package = Requirement(requirement).name
        lines.append(f"{name} {version} requires {requirement}, but the install would leave "
                     + (f"{package} {have}" if have else f"{package} missing"))
    return lines


def resolve(plan: Plan, before: Environment, on_line=None) -> Resolution:
    """Resolve the whole profile for the target; raises KitError (nothing changed) when it cannot."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="internlm-kit-resolve-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        argv = plan.resolve_command(report_path)
        output, code = run_captured(argv, on_line, RESOLVE_TIMEOUT)
        if code != 0:
            raise unresolvable(plan, argv, output)
        if plan.installer == "uv":
            changes = changes_from_uv(output, before)
        else:
            with open(report_path, encoding="utf-8") as handle:
                changes = changes_from_report(json.load(handle), before)
    conflicts = predicted_conflicts(before, changes, plan.target.python)
    fetched = [c.url for c in changes if c.kind != "remove"]
    size = download_size(fetched) if plan.installer != "uv" else None
    return Resolution(changes, conflicts, time.perf_counter() - started, output, size)


def run_captured(argv: list[str], on_line=None, timeout: float | None = None) -> tuple[str, int]:
    """Run a command, handing each output line to `on_line` as it comes; (all output, exit code).
    A command still running after `timeout` seconds is killed (a watchdog, so silence counts too)."""
    import threading

    lines = []
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise KitError(f"Could not run `{show_command(argv)}`: {exc}.",
                       "Check the interpreter and installer exist and are executable.") from None
    fired = []
    watchdog = threading.Timer(timeout, lambda: (fired.append(True), process.kill())) if timeout else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(lines[-1])
        code = process.wait()
    except BaseException:  # Ctrl-C: pip got the signal too; do not leave it running
        process.kill()
        process.wait()
        raise
    finally:
        if watchdog:
            watchdog.cancel()
    if fired:
        lines.append(f"ERROR: stopped after {timeout:.0f}s without finishing")
    return "\n".join(lines), code


def unresolvable(plan: Plan, argv: list[str], output: str) -> KitError:
    """pip's own explanation (its ERROR lines and the conflict it names), as a kit error."""
    lines = output.splitlines()
    keep = [line for line in lines if line.startswith(("ERROR", "error:"))]
    if keep and keep[0].startswith("error:"):  # uv: the error, then its indented explanation
        start = lines.index(keep[0])
        keep = lines[start:start + 10]
    if "The conflict is caused by:" in output:
        start = lines.index(next(l for l in lines if "The conflict is caused by:" in l))
        keep = lines[start:start + 8] + [k for k in keep if k not in lines[start:start + 8]]
    if not keep:
        keep = lines[-6:]
    detail = "\n    ".join(line.strip() for line in keep if line.strip())
    return KitError(
        f"The profile {plan.profile.name} cannot be installed into {plan.target.python} (Python "
        f"{plan.target.version}): the resolver found no set of versions that satisfies it. Nothing was "
        f"changed.\n    {detail}",
        f"Fix or remove the conflicting pin in {plan.profile.path or plan.profile.name} (each pin's 'why' says "
        f"what it is for), or try another profile (`internlm-kit install --list-profiles`). "
        f"To see the resolver's full output: `{show_command(argv)}`.")
