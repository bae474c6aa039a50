"""Download throughput: `internlm-kit download` (fetch + its sha256 verification) against
huggingface_hub's own `hf download`, the same files from the same loopback hub in the same run.

    .venv/bin/python benchmarks/download_speed.py [--shard-mb 200] [--rounds 3]

The server (tests/fixtures/hub.py) serves two safetensors shards of --shard-mb each plus the small
files of internlm2-chat-1_8b's layout. Each round runs both tools into fresh folders, alternating
which goes first; the figure is the ratio of median throughputs (kit / hf), >= 0.9 is the target.
Both are run as the CLI a user types, so process start-up counts for both.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.hub import MiB, HubRepo, HubServer, build_model_repo  # noqa: E402

REPO = "internlm/internlm2-chat-1_8b"
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and the child's CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        folder = build_model_repo(work / "served", shard_sizes=(args.shard_mb * MiB, args.shard_mb * MiB), seed=1)
        repo = HubRepo.from_folder(REPO, folder)
        total = sum(f.size for f in repo.files.values())
        with HubServer(repo) as hub:
            env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(work / "hf-home"),
                       HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                       INTERNLM_KIT_SHARE_ROOTS="")
            commands = {
                "hf": lambda dest: [str(BIN / "hf"), "download", REPO, "--local-dir", str(dest)],
                "kit": lambda dest: [str(BIN / "internlm-kit"), "download", REPO, "--source", "hf",
                                     "--local-dir", str(dest)],
            }
            times: dict[str, list[float]] = {"hf": [], "kit": []}
            cpu: dict[str, list[float]] = {"hf": [], "kit": []}
            for i in range(args.rounds):
                order = ["hf", "kit"] if i % 2 == 0 else ["kit", "hf"]
                for name in order:
                    dest = work / f"{name}-{i}"
                    wall, cpu_s = run(commands[name](dest), env)
                    times[name].append(wall)
                    cpu[name].append(cpu_s)
                    shutil.rmtree(dest)
                    shutil.rmtree(work / "hf-home", ignore_errors=True)
        mbps = {k: total / statistics.median(v) / 1e6 for k, v in times.items()}
        print(f"files: {len(repo.files)}, {total / 1e6:.0f} MB per download (2 x {args.shard_mb} MiB shards + small files)")
        for name in ("hf", "kit"):
            print(f"  {name:>3}: median {statistics.median(times[name]):.2f} s  ({mbps[name]:.0f} MB/s)  "
                  f"client CPU {statistics.median(cpu[name]):.2f} s  runs: {', '.join(f'{t:.2f}' for t in times[name])}")
        print(f"throughput ratio kit/hf: {mbps['kit'] / mbps['hf']:.2f}  (target >= 0.90; kit includes its sha256 pass)")
        print(f"command: .venv/bin/python benchmarks/download_speed.py --shard-mb {args.shard_mb} --rounds {args.rounds}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
