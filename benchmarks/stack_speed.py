"""`internlm-kit chat` on every stack the kit supports, side by side in one run: peak memory and
decode speed of the same reply on the same folder, in the developers' venv (transformers 5.x) and
in the cached venvs of transformers 4.38.2 (the tutorial profile), 4.46.3 (the current profile)
and 4.57.6 (the newest 4.x) that tests/test_stacks.py proves. Beside each, the peak of a chat whose
prompt fills a 4096-token context and the doctor's memory estimate (system.ram's "~N needed",
made for that context), so the estimate is held against a measured peak.

    .venv/bin/python benchmarks/stack_speed.py [--runs 3] [--new-tokens 64] [--threads 2]

The folder is the benchmark shape of tests/fixtures/models.py (8 layers, hidden 512, about 26M
parameters, fp32 on the CPU) with the real config's 32768-token context and dynamic RoPE scaling:
on transformers 4.38 that context is what made LlamaModel build a 32768² mask on every forward
(10 GB and seconds per token) before the kit's engine built the mask for the tokens at hand.

Each run is a fresh `python -m setup_kit chat --prompt ... --json --greedy` process; its peak
resident memory comes from os.wait4's rusage (that process alone), its decode speed from its own
--json figures: (completion tokens - 1) / (reply seconds - first-token seconds). Stacks alternate
order between runs; figures are medians. Stack venvs missing from the cache are built first
(a few minutes each).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fixtures.memory_runs import chat_peak, doctor_ram_estimate, long_prompt  # noqa: E402
from fixtures.models import build_bench_internlm2  # noqa: E402
from fixtures.venvs import STACKS, stack_venv  # noqa: E402

PROMPT = "Please tell me a story about a small robot who learns to paint, with many details."


def transformers_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def chat_once(python: Path, model: Path, state: Path, new_tokens: int, threads: int, prompt: str = PROMPT) -> dict:
    """One `chat --prompt` process: its reply figures and its peak RSS in bytes."""
    reply, peak = chat_peak(python, model, state, prompt, new_tokens, "--threads", str(threads))
    decode = (reply["completion_tokens"] - 1) / max(1e-9, reply["seconds"] - reply["first_token_seconds"])
    return {"peak": peak, "decode": decode, "tokens": reply["completion_tokens"],
            "ttft": reply["first_token_seconds"], "reply": reply["reply"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    pythons = {transformers_version(Path(sys.executable)): Path(sys.executable)}
    for release in STACKS:
        pythons[release] = stack_venv(release)
    with tempfile.TemporaryDirectory(prefix="stack-bench-") as tmp:
        model = build_bench_internlm2(Path(tmp) / "bench-32k", max_position_embeddings=32768,
                                      rope_scaling={"type": "dynamic", "factor": 2.0})
        state = Path(tmp) / "state"
        runs: dict[str, list[dict]] = {name: [] for name in pythons}
        order = list(pythons)
        for index in range(args.runs):
            for name in (order if index % 2 == 0 else order[::-1]):
                runs[name].append(chat_once(pythons[name], model, state, args.new_tokens, args.threads))
        estimates = {name: f"{doctor_ram_estimate(python, model)[0]:.1f} GiB" for name, python in pythons.items()}
        full = {name: chat_once(python, model, state, 8, args.threads, long_prompt())["peak"]
                for name, python in pythons.items()}

    developers = order[0]
    base_peak = statistics.median(r["peak"] for r in runs[developers])
    base_decode = statistics.median(r["decode"] for r in runs[developers])
    replies = {name: {r["reply"] for r in rows} for name, rows in runs.items()}
    print(f"chat --prompt on {model.name} (about 26M parameters, 32768-token config), fp32, {args.threads} threads, "
          f"{args.new_tokens} new tokens greedy, medians of {args.runs} runs per stack\n")
    print("| transformers | peak RSS | vs 5.x | decode tok/s | vs 5.x | first token s | reply as 5.x "
          "| peak, 4096-token context | doctor's estimate for it |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in runs.items():
        peak = statistics.median(r["peak"] for r in rows)
        decode = statistics.median(r["decode"] for r in rows)
        ttft = statistics.median(r["ttft"] for r in rows)
        same = "yes" if replies[name] == replies[developers] else "no"
        print(f"| {name}{' (developers)' if name == developers else ''} | {peak / 2**30:.2f} GiB | "
              f"{peak / base_peak:.2f}x | {decode:.0f} | {decode / base_decode:.2f}x | {ttft:.3f} | {same} | "
              f"{full[name] / 2**30:.2f} GiB | {estimates[name]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
