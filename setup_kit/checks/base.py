"""What a check is, what it returns, and the runner that owns ordering, timing and crash isolation.

A check is a small function `(ctx) -> Result` registered with `@check(id, category, title, needs)`.
It reads facts from the `Context` and never prints. `needs` names the facts it reads, so the
doctor gathers only those (``--only hf.env`` never imports torch).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from setup_kit.modelfolder import ModelFolder
    from setup_kit.probe import EnvironmentFacts, GpuFacts, TorchFacts
    from setup_kit.profiles import Profile

STATUSES = ("ok", "warn", "fail", "skip", "error")
CATEGORIES = ("Python environment", "PyTorch and GPU", "System", "Hugging Face", "Model folder")


@dataclass
class Result:
    status: str
    summary: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None


def count(n: int, noun: str) -> str:
    """'1 shard', '2 shards'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def parameters(n: float) -> str:
    """'1.89B parameters', '25.7M parameters', '0.1M parameters' (a test model is not '0.00B')."""
    return f"{n / 1e9:.2f}B parameters" if n >= 1e9 else f"{n / 1e6:.1f}M parameters"


def ok(summary: str, *details: str) -> Result:
    return Result("ok", summary, list(details))


def warn(summary: str, fix: str | None = None, *details: str) -> Result:
    return Result("warn", summary, list(details), fix)


def fail(summary: str, fix: str, *details: str) -> Result:
    return Result("fail", summary, list(details), fix)


def skip(summary: str, *details: str) -> Result:
    return Result("skip", summary, list(details))


@dataclass
class CheckResult:
    id: str
    category: str
    status: str
    summary: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("seconds")
        return data


@dataclass(frozen=True)
class Check:
    id: str
    category: str
    title: str
    run: Callable[[Context], Result]
    needs: frozenset[str] = frozenset()  # env | torch | gpu | model | imports | rehearsal


REGISTRY: list[Check] = []


def check(id: str, category: str, title: str, needs: tuple[str, ...] = ()) -> Callable:
    """Register a check function under a stable id."""
    assert category in CATEGORIES, category

    def register(function: Callable[[Context], Result]) -> Callable[[Context], Result]:
        REGISTRY.append(Check(id, category, title, function, frozenset(needs)))
        return function

    return register


@dataclass
class Context:
    """The facts checks read. A fact the selected checks do not need stays None."""

    python: str  # the target interpreter
    env: EnvironmentFacts | None = None
    torch: TorchFacts | None = None
    gpu: GpuFacts | None = None
    model_path: Path | None = None
    model: ModelFolder | None = None
    imports: list[dict] | None = None  # the remote code's imports, tried in the target
    profile: Profile | None = None  # the profile checked against (None: pins not checked)
    profile_reason: str = ""
    profile_explicit: bool = False
    fix_profile: Profile | None = None  # where pinned fixes come from when no profile was chosen
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 | int8 | int4 (CPU formats)
    device: str = "auto"  # auto | cuda | cpu
    engine: str | None = None  # set by the preflight: the engine about to run
    engine_reason: str = ""  # why the doctor assumed that engine
    rehearsal: dict | None = None  # engine -> setup_kit.probe.rehearsal.RehearsalResult, for the engine rehearsed


def run_checks(checks: list[Check], ctx: Context) -> list[CheckResult]:
    """Run checks in order; a check that raises becomes status `error`, never a crash."""
    results = []
    for item in checks:
        started = time.perf_counter()
        try:
            result = item.run(ctx)
            if result.status not in STATUSES:
                raise ValueError(f"unknown status {result.status!r}")
            if result.status == "fail" and not result.fix:
                raise ValueError(f"failed without a fix: {result.summary}")
        except Exception as exc:  # crash isolation is the point
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result = Result("error", f"the check itself broke: {type(exc).__name__}: {exc}",
                            [f"{type(exc).__name__}: {exc}",
                             f"at {Path(where.filename).name}:{where.lineno} in {where.name}",
                             "This is a bug in internlm-kit; please report it with `internlm-kit doctor --json`."])
        results.append(CheckResult(item.id, item.category, result.status, result.summary,
                                   result.details, result.fix, time.perf_counter() - started))
    return results
