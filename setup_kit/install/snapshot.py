"""Snapshots of a target's installed distributions, and the exact way back to one.

A snapshot is what `pip inspect` says is installed (name, version, and where it came from for
editable, VCS and local installs), kept as JSON under `state_dir()/snapshots/`. Restoring one
uninstalls what was added since and reinstalls, without dependencies, every distribution whose
version or origin differs; distributions that did not change are left alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from setup_kit.errors import KitError, UsageError
from setup_kit.install.target import Target
from setup_kit.locations import state_dir

SCHEMA = 1
# Local version labels of torch builds and the index each comes from.
TORCH_LOCAL_INDEX = re.compile(r"\+(cu\d+|cpu|rocm[\d.]+)$")
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "triton"}


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    spec: str  # what `pip install` needs to put exactly this back
    editable: bool = False
    requires: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        from packaging.utils import canonicalize_name

        return str(canonicalize_name(self.name))


@dataclass
class Environment:
    """The target's installed distributions by canonical name, plus its marker environment."""
    distributions: dict[str, Installed]
    markers: dict = field(default_factory=dict)


def restore_spec(name: str, version: str, direct_url: dict | None) -> tuple[str, bool]:
    """The requirement that reinstalls this exact distribution (PEP 610 direct_url aware)."""
    if not direct_url:
        return f"{name}=={version}", False
    url = direct_url.get("url", "")
    if direct_url.get("dir_info", {}).get("editable"):
        return f"-e {url}", True
    if vcs := direct_url.get("vcs_info"):
        commit = vcs.get("commit_id")
        return f"{name} @ {vcs.get('vcs', 'git')}+{url}{'@' + commit if commit else ''}", False
    return f"{name} @ {url}", False


def list_installed(target: Target) -> Environment:
    """What is installed in the target, from its own `pip inspect`."""
    argv = target.pip_command("inspect", "--local")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        data = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        why = (_tail(done.stderr) if isinstance(exc, ValueError) else str(exc))
        raise KitError(f"Could not list the distributions installed in {target.python}: `pip inspect` failed "
                       f"({why}).", f"Check that `{' '.join(argv)}` runs.") from None
    distributions = {}
    for item in data.get("installed", []):
        meta = item["metadata"]
        spec, editable = restore_spec(meta["name"], meta["version"], item.get("direct_url"))
        dist = Installed(meta["name"], meta["version"], spec, editable, tuple(meta.get("requires_dist") or ()))
        distributions[dist.key] = dist
    return Environment(distributions, data.get("environment", {}))


def _tail(text: str, lines: int = 3) -> str:
    return " ".join(text.strip().splitlines()[-lines:]) or "no output"


@dataclass
class Snapshot:
    id: str
    created: str
    python: str
    python_version: str
    reason: str  # "before install --profile tutorial", ...
    distributions: list[dict]  # name, version, spec, editable
    path: Path | None = None
    schema: int = SCHEMA

    def by_key(self) -> dict[str, dict]:
        from packaging.utils import canonicalize_name

        return {str(canonicalize_name(d["name"])): d for d in self.distributions}

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2, ensure_ascii=False)


def snapshots_dir() -> Path:
    return state_dir() / "snapshots"


def save_snapshot(target: Target, environment: Environment, reason: str, label: str) -> Snapshot:
    """Write the snapshot atomically (temp file + rename): a crash never leaves half a snapshot."""
    directory = snapshots_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "snapshot"
    snapshot_id, n = f"{stamp}-{slug}", 1
    while (directory / f"{snapshot_id}.json").exists():
        n += 1
        snapshot_id = f"{stamp}-{slug}-{n}"
    dists = [{"name": d.name, "version": d.version, "spec": d.spec, "editable": d.editable}
             for d in sorted(environment.distributions.values(), key=lambda d: d.key)]
    snapshot = Snapshot(snapshot_id, time.strftime("%Y-%m-%dT%H:%M:%S%z"), target.python, target.version,
                        reason, dists, directory / f"{snapshot_id}.json")
    partial = snapshot.path.with_suffix(".json.partial")
    partial.write_text(snapshot.to_json(), encoding="utf-8")
    os.replace(partial, snapshot.path)
    return snapshot


def load_snapshot(path: Path) -> Snapshot:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Snapshot(data["id"], data["created"], data["python"], data["python_version"], data.get("reason", ""),
                        list(data["distributions"]), path, data.get("schema", SCHEMA))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"The snapshot {path} cannot be read ({exc}).",
                         f"Pick another one from {snapshots_dir()}, or delete this file.") from None


def list_snapshots(python: str | None = None) -> list[Snapshot]:
    """Snapshots, oldest first; only those of `python` when given."""
    directory = snapshots_dir()
    found = [load_snapshot(p) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []
    if python is not None:
        found = [s for s in found if os.path.realpath(s.python) == os.path.realpath(python) or s.python == python]
    return sorted(found, key=lambda s: (s.created, s.id))


def find_snapshot(name: str | None, python: str) -> Snapshot:
    """The named snapshot (id or path), or the latest one of this interpreter."""
    if name in (None, "", "latest"):
        mine = list_snapshots(python)
        if not mine:
            raise KitError(f"There is no snapshot of {python} to roll back to (looked in {snapshots_dir()}).",
                           "Snapshots are taken by `internlm-kit install` before it changes anything; "
                           "pass --python for the environment that was installed into.")
        return mine[-1]
    path = Path(name).expanduser()
    if not (path.suffix == ".json" and path.is_file()):
        path = snapshots_dir() / f"{name}.json"
    if not path.is_file():
        known = ", ".join(s.id for s in list_snapshots(python)[-5:]) or "none"
        raise UsageError(f"There is no snapshot '{name}' (latest of {python}: {known}).",
                         "Pass one of those ids, a path to a snapshot .json, or no value for the latest.")
    return load_snapshot(path)


@dataclass
class RestorePlan:
    remove: list[str]  # names installed now but not in the snapshot
    reinstall: list[dict]  # snapshot entries whose version or origin differs now (or that are gone)
    unchanged: int

    @property
    def empty(self) -> bool:
        return not self.remove and not self.reinstall


def restore_plan(snapshot: Snapshot, now: Environment) -> RestorePlan:
    """A pure comparison: what to uninstall and reinstall so `now` becomes the snapshot again."""
    then = snapshot.by_key()
    remove = sorted(d.name for key, d in now.distributions.items() if key not in then)
    reinstall, unchanged = [], 0
    for key, entry in sorted(then.items()):
        current = now.distributions.get(key)
        if current is not None and current.version == entry["version"] and current.spec == entry["spec"]:
            unchanged += 1
        else:
            reinstall.append(entry)
    return RestorePlan(remove, reinstall, unchanged)


def restore_commands(target: Target, plan: RestorePlan, torch_index: str | None = None) -> list[list[str]]:
    """Uninstall first (so nothing added survives), then reinstall the exact old versions, no deps."""
    commands = []
    if plan.remove:
        commands.append(target.pip_command("uninstall", "--yes", *plan.remove))
    plain, editable = [], []
    for entry in plan.reinstall:
        (editable if entry.get("editable") else plain).append(entry["spec"])
    extra = ["--extra-index-url", torch_index] if torch_index else []
    if plain:
        commands.append(target.pip_command("install", "--no-deps", *extra, *plain))
    for spec in editable:
        commands.append(target.pip_command("install", "--no-deps", *spec.split(" ", 1)))
    return commands


def torch_build_index(plan: RestorePlan) -> str | None:
    """Old torch builds with a local label (2.5.1+cu121) live on download.pytorch.org, not PyPI."""
    for entry in plan.reinstall:
        if entry["name"].lower() in TORCH_FAMILY and (match := TORCH_LOCAL_INDEX.search(entry["version"])):
            return f"https://download.pytorch.org/whl/{match.group(1)}"
    return None
