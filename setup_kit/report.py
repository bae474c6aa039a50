"""The doctor's report: the results, the target they describe, rendered flutter-style or as JSON."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from setup_kit.checks.base import CATEGORIES, CheckResult

SCHEMA = 1
SYMBOLS = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "red"),
           "skip": ("-", "dim"), "error": ("✗", "magenta")}
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)


def _secret_values() -> list[str]:
    return sorted((v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8),
                  key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


@dataclass
class Report:
    target: dict
    checks: list[CheckResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Belt and braces: the probe already redacts, but no secret value may leave through any path.
        secrets = _secret_values()
        if secrets:
            for result in self.checks:
                result.summary = scrub(result.summary, secrets)
                result.details = [scrub(d, secrets) for d in result.details]
                result.fix = scrub(result.fix, secrets) if result.fix else result.fix

    @property
    def ok(self) -> bool:
        return not any(c.status in ("fail", "error") for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SYMBOLS, 0)
        for result in self.checks:
            counts[result.status] += 1
        return counts

    def get(self, check_id: str) -> CheckResult | None:
        return next((c for c in self.checks if c.id == check_id), None)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "ok": self.ok, "target": self.target,
                "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)


def summary_line(report: Report) -> str:
    counts = report.counts()
    parts = []
    if counts["fail"]:
        parts.append(f"{counts['fail']} problem{'s' if counts['fail'] != 1 else ''}")
    if counts["error"]:
        parts.append(f"{counts['error']} check{'s' if counts['error'] != 1 else ''} crashed")
    if counts["warn"]:
        parts.append(f"{counts['warn']} warning{'s' if counts['warn'] != 1 else ''}")
    parts.append(f"{counts['ok']} ok")
    if counts["skip"]:
        parts.append(f"{counts['skip']} skipped")
    head = "No problems found" if report.ok else "Problems found"
    return f"{head}: {', '.join(parts)}."


def render(report: Report, console, verbose: bool = False) -> None:
    """Categories in order, one line per check, fixes under failures, details with -v."""
    from rich.markup import escape

    target = report.target
    console.print(f"[bold]internlm-kit doctor[/] for {escape(str(target.get('python', '?')))} "
                  f"(Python {escape(str(target.get('python_version', '?')))}, {escape(str(target.get('platform', '')))})")
    console.print(f"  profile: {escape(str(target.get('profile') or 'none'))} ({escape(str(target.get('profile_reason', '')))})",
                  style="dim")
    for category in CATEGORIES:
        results = [c for c in report.checks if c.category == category]
        if not results or (not verbose and all(r.status == "skip" for r in results)):
            continue
        worst = next((s for s in ("error", "fail", "warn", "ok") if any(r.status == s for r in results)), "skip")
        symbol, colour = SYMBOLS[worst]
        console.print(f"[{colour}]\\[{symbol}][/] [bold]{category}[/]")
        for result in results:
            symbol, colour = SYMBOLS[result.status]
            if result.status == "skip" and not verbose:
                continue
            # -v: the check's id in its own column, so it does not read as the summary's first word.
            width = max(len(r.id) for r in results)
            label = f"[dim]{result.id:<{width}}[/]  " if verbose else ""
            console.print(f"    [{colour}]{symbol}[/] {label}{escape(result.summary)}", highlight=False)
            if result.fix and result.status in ("fail", "warn", "error"):
                for n, line in enumerate(result.fix.splitlines()):
                    console.print(f"        {'fix: ' if n == 0 else '     '}[cyan]{escape(line)}[/]", highlight=False,
                                  soft_wrap=True)
            if verbose or result.status == "error":
                for line in result.details:
                    console.print(f"        [dim]{escape(line)}[/]", highlight=False)
    colour = "green" if report.ok else "red"
    hint = "" if verbose else " (details: -v)"
    console.print(f"[{colour}]{escape(summary_line(report))}[/]{hint}")
