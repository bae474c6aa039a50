"""The plan: the exact commands an install runs, torch first from its profile's source.

The profile's torch source is passed as an *extra* index, so everything else still comes from
PyPI (or whatever the user's pip is configured with) and a local build label such as `+cu121`
wins over PyPI's build of the same version. An unreachable source is found out up front, in
seconds: pip would otherwise retry it for minutes on every package it looks up.
"""

from __future__ import annotations

import shlex
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache

from setup_kit.errors import KitError
from setup_kit.install.target import Target
from setup_kit.profiles import Profile

INDEX_TIMEOUT = 5.0


def find_uv() -> str | None:
    """uv on PATH, or installed beside the kit's own interpreter (`pip install uv` in its venv)."""
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "uv"
    return shutil.which("uv") or (str(beside) if beside.exists() else None)


@lru_cache(maxsize=16)
def index_problem(url: str, timeout: float = INDEX_TIMEOUT) -> str | None:
    """None when the index answers HTTP at all; else why it cannot be reached."""
    if url.startswith("file:"):
        return None
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "internlm-kit"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered; pip will see what it serves
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


@dataclass
class Plan:
    profile: Profile
    target: Target
    installer: str  # pip | uv
    torch_index: str = ""  # the extra index torch comes from; "" when none (or unreachable)
    notes: list[str] = field(default_factory=list)

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.profile.pins]

    def _index_args(self) -> list[str]:
        return ["--extra-index-url", self.torch_index] if self.torch_index else []

    def _install(self, *args: str) -> list[str]:
        if self.installer == "uv":
            return [find_uv() or "uv", "pip", "install", "--python", self.target.python, *args]
        return self.target.pip_command("install", *args)

    def commands(self) -> list[list[str]]:
        """torch's group first from its source, then every pin (torch's again, so nothing moves it)."""
        torch = [p.requirement for p in self.profile.torch_pins]
        commands = []
        if torch:
            commands.append(self._install(*self._index_args(), *torch))
        commands.append(self._install(*self._index_args(), *self.requirements))
        return commands

    def resolve_command(self, report_path: str) -> list[str]:
        """The whole profile resolved at once, installing nothing."""
        if self.installer == "uv":
            return self._install("--dry-run", *self._index_args(), *self.requirements)
        # fast-deps reads a wheel's metadata with HTTP range requests when the index does not
        # serve it separately (PyPI has none for torch 2.1.2: without it pip fetches 2.5 GB of
        # CUDA wheels just to resolve); pip falls back to a full download where ranges fail.
        return self._install("--dry-run", "--use-feature=fast-deps", "--report", report_path,
                             *self._index_args(), *self.requirements)


def make_plan(profile: Profile, target: Target, installer: str, torch_index_url: str | None,
              dry_run: bool) -> Plan:
    plan = Plan(profile, target, installer)
    if installer == "uv" and find_uv() is None:
        plan.installer = "pip"
        plan.notes.append("--installer uv was asked for, but uv is not on PATH: using pip")
    url = torch_index_url if torch_index_url is not None else profile.torch_index_url
    if not url:
        return plan
    problem = index_problem(url)
    if problem is None:
        plan.torch_index = url
        return plan
    why = f" ({profile.torch_source_why})" if profile.torch_source_why else ""
    message = f"the torch source {url} cannot be reached from here ({problem})"
    # A dry run refuses as the real run does: it says what the install would do, refusal included.
    if profile.cuda:
        raise KitError(f"Cannot install profile {profile.name}: {message}. Its torch build comes only from there{why}.",
                       "Check the network or proxy (pip honours HTTPS_PROXY), or pass --torch-index-url with a "
                       "mirror of that index.")
    fallback = "its build may differ from the profile's" if profile.cuda else "PyPI's torch also runs on CPU, but it is the larger CUDA build"
    plan.notes.append(f"{message}: torch is resolved from your configured indexes instead; {fallback}{why}")
    return plan


def show_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
