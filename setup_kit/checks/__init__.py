"""The doctor's checks: one small function per check, each with a stable id (see `base.py`)."""

from __future__ import annotations

from setup_kit.checks.base import (CATEGORIES, REGISTRY, Check, CheckResult, Context, Result,
                                   check, fail, ok, run_checks, skip, warn)

__all__ = ["CATEGORIES", "Check", "CheckResult", "Context", "Result", "all_checks", "check", "fail",
           "ok", "run_checks", "select_checks", "skip", "warn"]


def all_checks() -> list[Check]:
    """Every registered check, grouped by category in display order."""
    from setup_kit.checks import gpu, model, packages, system  # noqa: F401  (registers them)

    return sorted(REGISTRY, key=lambda c: CATEGORIES.index(c.category))


def select_checks(only: list[str] | None) -> list[Check]:
    """The checks named by ids or id prefixes (``model`` selects every ``model.*``)."""
    from setup_kit.errors import UsageError

    checks = all_checks()
    if not only:
        return checks
    chosen = []
    for wanted in only:
        matches = [c for c in checks if c.id == wanted or c.id.startswith(wanted + ".")]
        if not matches:
            raise UsageError(f"There is no check '{wanted}'.",
                             "See the ids with: internlm-kit doctor --list-checks")
        chosen.extend(m for m in matches if m not in chosen)
    return [c for c in checks if c in chosen]
