"""How fast `internlm-kit doctor` and `internlm-kit --help` are, against `python -c "import torch"`.

The doctor's floor is the torch import it runs in its own subprocess, so it is measured side by
side with exactly that, alternating runs in one process, medians of several. Targets (issue 2):
doctor < 1.5x the torch import; --help < 0.25 s.

    .venv/bin/python benchmarks/doctor_speed.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],  # interpreter start-up: shows how loaded the machine is
    "import torch": [sys.executable, "-c", "import torch"],
    "internlm-kit doctor": [str(BIN / "internlm-kit"), "doctor"],
    "internlm-kit --help": [str(BIN / "internlm-kit"), "--help"],
}


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    for argv in COMMANDS.values():  # warm the page cache once
        wall(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            times[name].append(wall(argv))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:<22} median {median[name]:6.3f} s   runs: {' '.join(f'{v:.2f}' for v in values)}")
    ratio = median["internlm-kit doctor"] / median["import torch"]
    help_ok = median["internlm-kit --help"] < 0.25
    print(f"doctor / import torch = {ratio:.2f}x (target < 1.5x: {'met' if ratio < 1.5 else 'NOT met'}); "
          f"--help {median['internlm-kit --help']:.3f} s (target < 0.25 s: {'met' if help_ok else 'NOT met'})")
    print(f"command: {sys.executable} benchmarks/doctor_speed.py --runs {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
