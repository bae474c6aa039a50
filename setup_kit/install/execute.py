"""Running the install commands: a progress line per step, pip's or uv's own output under -v,
and everything written to a log under the state directory."""

from __future__ import annotations

import re
import subprocess
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


RAW_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")


def with_raw_progress(argv: list[str]) -> list[str]:
    """pip >= 24.1 reports download progress as `Progress N of M` lines when asked (its bar is drawn
    only on a terminal, and pip's output comes here through a pipe): ask, so a 2 GB torch wheel
    shows how far it is instead of minutes of silence. Older pips and uv run as planned."""
    if "install" not in argv or Path(argv[0]).name.startswith("uv"):
        return argv
    at = argv.index("install")
    try:
        shown = subprocess.run([*argv[:at], "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return argv
    found = re.match(r"pip (\d+)\.(\d+)", shown)
    if not found or (int(found[1]), int(found[2])) < (24, 1):
        return argv
    return [*argv[:at + 1], "--progress-bar", "raw", *argv[at + 1:]]


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
                last = [""]

                def on_line(line: str, status=status) -> None:
                    if raw := RAW_PROGRESS.match(line.strip()):
                        done, total = int(raw[1]), int(raw[2])
                        if total:
                            status.update(f"{title} {number}/{len(commands)}: {last[0][:80]}  "
                                          f"{done / 1e6:.0f}/{total / 1e6:.0f} MB ({100 * done // total}%)")
                        return
                    handle.write(line + "\n")
                    if verbose:
                        console.print(f"    {line}", markup=False, highlight=False)
                    elif PROGRESS.match(line):
                        last[0] = line.strip()
                        status.update(f"{title} {number}/{len(commands)}: {line.strip()[:100]}")

                output, code = run_captured(with_raw_progress(list(argv)), on_line)
                output = "\n".join(line for line in output.splitlines() if not RAW_PROGRESS.match(line.strip()))
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
