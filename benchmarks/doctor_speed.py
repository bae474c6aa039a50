"""How fast `internlm-kit doctor` and `internlm-kit --help` are, against `python -c "import torch"`, and
`doctor --model DIR --engine remote-code` (the rehearsal included) against the tutorial's own tokenizer +
model load of the same folder in the same interpreter.

The doctor's floor is the torch import it runs in its own subprocess, so it is measured side by
side with exactly that, alternating runs in one process, medians of several. Targets (issues 2 and 9):
doctor < 1.5x the torch import; --help < 0.25 s; doctor --model --engine remote-code < 1.5x the
tutorial's load.

The model is the benchmark folder (8 layers x 512, ~30M parameters, tests/fixtures/models.py) with the
latest-shaped stand-in remote code, in `--python` (default: the test suite's cached transformers 4.46.3
venv, the current profile's stack, when it exists; else this interpreter with the early-2024 stand-in,
the one revision that imports on 5.x).

    .venv/bin/python benchmarks/doctor_speed.py [--runs 7] [--python VENV/bin/python]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TUTORIAL_LOAD = """import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, torch_dtype=torch.float32,
                                             device_map="auto").eval()
"""


def model_commands(python: str | None, root: Path) -> dict[str, list[str]]:
    from fixtures.models import build_bench_internlm2
    from fixtures.rehearsal_revisions import remote_code_folder
    from fixtures.venvs import VENV_CACHE

    if python is None:
        cached = sorted(VENV_CACHE.glob("current-stack-*/bin/python"))
        python = str(cached[0]) if cached else sys.executable
    revision = "early-2024" if python == sys.executable else "latest"
    base = build_bench_internlm2(root / "base")
    folder = remote_code_folder(base, root / f"internlm2-chat-{revision}", revision)
    print(f"model: {folder} (~30M parameters, {revision} stand-in) in {python}")
    return {"chat's pre-flight": [sys.executable, "-c", PREFLIGHT, str(base)],
            "tutorial's load": [python, "-c", TUTORIAL_LOAD, str(folder)],
            "doctor --model --engine remote-code": [str(BIN / "internlm-kit"), "doctor", "--python", python,
                                                    "--model", str(folder), "--engine", "remote-code"]}
# What `chat` runs before loading anything (the native engine's checks); it must not import torch.
PREFLIGHT = "import sys; from setup_kit.doctor import preflight; preflight('native', sys.argv[1], 'auto', 'auto')"

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
    parser.add_argument("--python", help="the interpreter the model is loaded and rehearsed in")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="doctor-speed-")
    COMMANDS.update(model_commands(args.python, Path(scratch.name)))
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
    rehearsal = median["doctor --model --engine remote-code"] / median["tutorial's load"]
    print(f"doctor --model --engine remote-code / the tutorial's load = {rehearsal:.2f}x "
          f"(target < 1.5x: {'met' if rehearsal < 1.5 else 'NOT met'})")
    preflight = median["chat's pre-flight"]
    print(f"chat's pre-flight {preflight:.3f} s, {preflight / median['import torch']:.2f}x import torch "
          f"(target < 1 s, no torch import: {'met' if preflight < 1.0 else 'NOT met'})")
    print(f"command: {sys.executable} benchmarks/doctor_speed.py --runs {args.runs}"
          + (f" --python {args.python}" if args.python else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
