"""Convert throughput against copying the same bytes, measured side by side in one run.

    .venv/bin/python benchmarks/convert_speed.py [--runs 5] [--layers 8] [--hidden 512] [--dtype auto]

Builds the "tiny but not trivial" InternLM2 benchmark checkpoint of tests/fixtures/models.py (8
layers, hidden 512, random fp32 weights, 2 safetensors shards), then alternates two jobs on it:
`convert_checkpoint(SRC, DST)` (read, split wqkv, rename, write sharded safetensors + index, build
and write the tokenizer) and `shutil.copyfile` of the same weight files into a fresh folder (the
floor: what moving those bytes costs on this disk). Figures are medians over --runs; each job
ends with os.sync() inside its timing so neither leaves its writes in the page cache for the next.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fixtures.models import BENCH_SHAPE, build_bench_internlm2  # noqa: E402


def copy_weights(src: Path, dst: Path) -> int:
    dst.mkdir()
    total = 0
    for path in sorted(src.glob("*.safetensors")):
        shutil.copyfile(path, dst / path.name)
        total += path.stat().st_size
    os.sync()
    return total


def convert(src: Path, dst: Path, dtype: str) -> int:
    from setup_kit.convert import convert_checkpoint

    result = convert_checkpoint(src, dst, dtype=dtype)
    os.sync()
    return result.bytes_written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=BENCH_SHAPE["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=BENCH_SHAPE["hidden_size"])
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        work = Path(tmp)
        src = build_bench_internlm2(work / "src", num_hidden_layers=args.layers,
                                    hidden_size=args.hidden, intermediate_size=3 * args.hidden)
        source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        convert(src, work / "warmup", args.dtype)  # imports, first tokenizer build
        shutil.rmtree(work / "warmup")
        times: dict[str, list[float]] = {"convert": [], "copy": []}
        for run in range(args.runs):
            jobs = [("convert", lambda d: convert(src, d, args.dtype)),
                    ("copy", lambda d: copy_weights(src, d))]
            for name, job in (jobs if run % 2 == 0 else jobs[::-1]):
                dst = work / f"{name}-{run}"
                started = time.perf_counter()
                job(dst)
                times[name].append(time.perf_counter() - started)
                shutil.rmtree(dst)

    convert_s, copy_s = statistics.median(times["convert"]), statistics.median(times["copy"])
    mb = source_bytes / 1e6
    print(f"checkpoint: {args.layers} layers, hidden {args.hidden}, {mb:.1f} MB of safetensors "
          f"(fp32), dtype {args.dtype}; medians of {args.runs} runs")
    print(f"convert:  {convert_s * 1000:8.1f} ms  {mb / convert_s:8.1f} MB/s")
    print(f"copy:     {copy_s * 1000:8.1f} ms  {mb / copy_s:8.1f} MB/s")
    print(f"convert throughput / copy throughput = {copy_s / convert_s:.2f}")
    print(f"command: .venv/bin/python benchmarks/convert_speed.py --runs {args.runs} "
          f"--layers {args.layers} --hidden {args.hidden} --dtype {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
