"""Running the install commands: a progress line per step, pip's or uv's own output under -v,
and everything written to a log under the state directory."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from setup_kit.install.plan import show_command
from setup_kit.install.resolve import run_captured
from setup_kit.locations import state_dir

# pip's lines worth showing as progress (the rest is noise between them).
PROGRESS = re.compile(r"^\s*(Collecting|Downloading|Using cached|Installing collected|Building|"
                      r"Attempting uninstall|Successfully|Resolved|Prepared|Installed|Uninstalled|\+|-)\s?")


@dataclass
class StepResult:
    argv: list[str]
    code: int
    output: str
    seconds: float


def log_path(label: str) -> Path:
    directory = state_dir() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}.log"


def run_steps(commands: list[list[str]], console, verbose: bool, log: Path, title: str) -> list[StepResult]:
    """Run commands in order, stopping at the first failure; returns what each did."""
    results = []
    with log.open("a", encoding="utf-8") as handle:
        for number, argv in enumerate(commands, 1):
            heading = f"{title} {number}/{len(commands)}: {show_command(argv)}"
            console.print(f"[bold]>[/] {heading}", highlight=False, markup=True, soft_wrap=True)
            handle.write(f"$ {show_command(argv)}\n")
            started = time.perf_counter()
            with console.status(f"{title} {number}/{len(commands)}", spinner="dots") as status:
                def on_line(line: str, status=status) -> None:
                    handle.write(line + "\n")
                    if verbose:
                        console.print(f"    {line}", markup=False, highlight=False)
                    elif PROGRESS.match(line):
                        status.update(f"{title} {number}/{len(commands)}: {line.strip()[:100]}")

                output, code = run_captured(list(argv), on_line)
            seconds = time.perf_counter() - started
            handle.write(f"# exit {code} after {seconds:.1f}s\n")
            results.append(StepResult(list(argv), code, output, seconds))
            if code != 0:
                break
            console.print(f"  done in {seconds:.1f}s", style="dim")
    return results


def failure_tail(result: StepResult, lines: int = 12) -> str:
    wanted = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in wanted if line.startswith("ERROR")]
    return "\n    ".join((errors or wanted)[-lines:])
