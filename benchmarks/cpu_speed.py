"""CPU speed at internlm2-chat-1_8b's shape, side by side in one run: `internlm-kit chat` with its CPU
defaults vs the kit's bf16 vs llama.cpp's Q4_K_M of the same weights (llama-bench).

    .venv/bin/python benchmarks/cpu_speed.py --llama-cpp DIR [--runs 3] [--threads 2]

The model: hidden 2048, 24 layers, 16 heads / 8 KV heads, intermediate 8192, vocab 92544 (the
fixture tokenizer grown to the real size), random bf16 weights, written once into --workdir (3.8 GB).
The GGUF is llama.cpp's own `convert_hf_to_gguf.py` on that InternLM2 folder, then
`llama-quantize ... Q4_K_M`, both cached beside it.

Each engine is a process of its own, its peak resident memory from `os.wait4`: the kit's are
`internlm-kit chat --prompt ... --json` (greedy, 128 new tokens after a ~100-token prompt, end of turn
never reached on random weights), with no --dtype / --threads for the default path and
`--dtype bf16 --threads N` beside it; llama.cpp's is `llama-bench -t N -p 100 -n 128 -r 1` (its CPU
repacking off, as issue 13 measured it; `--repack` adds a run with it on). Prompt speed is prompt
tokens / time to the first token for the kit (it includes the first token's own decode step),
llama-bench's pp100 for llama.cpp; decode is (tokens - 1) / the time after the first token. The
order of the engines rotates every run; figures are medians. The default path's first process
makes the quantized cache; that run is a warm-up and not counted.

DIR is a llama.cpp source tree with llama-bench and llama-quantize built in DIR/build/bin; this
project commits none of it. To make one from the llama-cpp-python sdist on PyPI (~10 CPU-minutes):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llamacpp
    tar xzf /tmp/llamacpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llamacpp
    cd /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j2 --target llama-bench llama-quantize
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

REAL_SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=8192, num_hidden_layers=24)
PROMPT = ("Please write a long and detailed story about a small robot who lives in a lighthouse by the sea, "
          "learns to paint the waves, the boats and the storms, and one day meets a painter from the city "
          "who teaches it about colour, light and shade. Describe every painting.")
GIB = 1024 ** 3


def build_folder(workdir: Path, layers: int) -> Path:
    """The real-shape InternLM2 folder, made once (random bf16 weights, a 92544-piece tokenizer)."""
    from fixtures.models import build_tiny_internlm2, grow_tokenizer_model, train_tokenizer_model

    folder = workdir / f"internlm2-1_8b-shape-{layers}"
    if (folder / "done").is_file():
        return folder
    tokenizer = train_tokenizer_model(workdir / "tokenizer")
    grow_tokenizer_model(tokenizer)
    build_tiny_internlm2(folder, **{**REAL_SHAPE, "num_hidden_layers": layers}, shards=2, dtype="bfloat16",
                         max_position_embeddings=32768, tokenizer_model=tokenizer)
    (folder / "done").write_text("")
    return folder


def build_gguf(folder: Path, llama_cpp: Path) -> Path:
    """llama.cpp's converter on the InternLM2 folder (bf16), then its quantizer to Q4_K_M; cached."""
    quantized = folder.with_name(folder.name + "-Q4_K_M.gguf")
    if quantized.is_file():
        return quantized
    full = folder.with_name(folder.name + "-bf16.gguf")
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(full),
                    "--outtype", "bf16"], check=True, env=env)
    subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(full), str(quantized), "Q4_K_M"],
                   check=True)
    full.unlink()
    return quantized


def timed(command: list[str], env: dict) -> tuple[str, str, int]:
    """(stdout, stderr, peak resident bytes of the process) for a command that must succeed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        errors = err.read().decode()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{command[0]} failed:\n{errors[-3000:]}")
        return out.read().decode(), errors, usage.ru_maxrss * 1024


def kit_chat(folder: Path, state: Path, new_tokens: int, *options: str) -> dict:
    env = {**os.environ, "INTERNLM_KIT_STATE_DIR": str(state)}
    command = [sys.executable, "-m", "setup_kit", "chat", "--model", str(folder), "--device", "cpu", *options,
               "--system", "", "--greedy", "--max-new-tokens", str(new_tokens), "--prompt", PROMPT, "--json", "--skip-checks"]
    started = time.perf_counter()
    out, err, peak = timed(command, env)
    turn = json.loads(out.strip().splitlines()[-1])
    decode_time = turn["seconds"] - turn["first_token_seconds"]
    return {"prompt": turn["prompt_tokens"] / turn["first_token_seconds"],
            "decode": (turn["completion_tokens"] - 1) / decode_time, "peak": peak,
            "tokens": turn["completion_tokens"], "prompt_tokens": turn["prompt_tokens"],
            "wall": time.perf_counter() - started,
            "banner": next((line for line in err.splitlines() if "native engine" in line), "").strip()}


def llama_bench(llama_cpp: Path, gguf: Path, threads: int, new_tokens: int, repack: bool) -> dict:
    command = [str(llama_cpp / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads),
               "-p", "100", "-n", str(new_tokens), "-r", "1", "-o", "json", "--repack", "1" if repack else "0"]
    out, _, peak = timed(command, dict(os.environ))
    rows = json.loads(out)
    prompt = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prompt": prompt["avg_ts"], "decode": decode["avg_ts"], "peak": peak, "tokens": new_tokens,
            "prompt_tokens": 100}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, metavar="DIR",
                        help="llama.cpp source tree with build/bin/llama-bench and llama-quantize")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "internlm-kit" / "cpu-speed")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="for bf16 and llama.cpp (the default path picks its own)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repack", action="store_true", help="also llama.cpp with its CPU repacking on")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = build_folder(args.workdir, args.layers)
    gguf = build_gguf(folder, args.llama_cpp.resolve())
    state = args.workdir / "state"
    started = time.perf_counter()
    warm = kit_chat(folder, state, 4, "--dtype", "int4")  # makes the quantized cache (once per folder)
    print(f"warm-up (int4 cache made if missing): {time.perf_counter() - started:.0f} s, "
          f"peak {warm['peak'] / GIB:.2f} GiB; its banner: {warm['banner']}", flush=True)

    engines = {
        "internlm-kit chat, CPU defaults": lambda: kit_chat(folder, state, args.new_tokens),
        "internlm-kit chat --dtype fp32": lambda: kit_chat(folder, state, args.new_tokens, "--dtype", "fp32"),
        f"internlm-kit chat --dtype bf16 --threads {args.threads}":
            lambda: kit_chat(folder, state, args.new_tokens, "--dtype", "bf16", "--threads", str(args.threads)),
        f"llama.cpp Q4_K_M (llama-bench -t {args.threads}, repack off)":
            lambda: llama_bench(args.llama_cpp, gguf, args.threads, args.new_tokens, False),
    }
    if args.threads != 1:  # the default path takes fewer threads on a busy machine: llama.cpp so too
        engines["llama.cpp Q4_K_M (llama-bench -t 1, repack off)"] = \
            lambda: llama_bench(args.llama_cpp, gguf, 1, args.new_tokens, False)
    if args.repack:
        engines[f"llama.cpp Q4_K_M (llama-bench -t {args.threads}, repack on)"] = \
            lambda: llama_bench(args.llama_cpp, gguf, args.threads, args.new_tokens, True)
    names = list(engines)
    results: dict[str, list[dict]] = {name: [] for name in names}
    loads = [load_average()]
    for run in range(args.runs):
        for name in names[run % len(names):] + names[:run % len(names)]:
            results[name].append(engines[name]())
            r = results[name][-1]
            print(f"  run {run + 1}: {name}: prompt {r['prompt']:.1f} tok/s, decode {r['decode']:.2f} tok/s, "
                  f"peak {r['peak'] / GIB:.2f} GiB", flush=True)
        loads.append(load_average())

    print(f"\nat the 1.8B shape ({args.layers} layers), {args.new_tokens} new tokens after a "
          f"{warm['prompt_tokens']}-token prompt (llama-bench: 100), median of {args.runs} runs, "
          f"engines alternating; load average during the runs: {'; '.join(loads)}")
    print(f"| engine | decode tok/s | prompt tok/s | peak RSS | file |")
    print("| --- | ---: | ---: | ---: | ---: |")
    median = {name: {k: statistics.median(r[k] for r in rows) for k in ("prompt", "decode", "peak")}
              for name, rows in results.items()}
    fmt = re.search(r"· cpu (\w+)", warm["banner"])
    cache = sum(p.stat().st_size for p in state.glob(f"quantized/{folder.name}-*-{fmt[1] if fmt else '*'}/chunk-*"))
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    files = {names[0]: cache, names[1]: weights, names[2]: weights}
    for name in names:
        m = median[name]
        size = files.get(name, gguf.stat().st_size)
        print(f"| {name} | {m['decode']:.2f} | {m['prompt']:.1f} | {m['peak'] / GIB:.2f} GiB | {size / 1e9:.2f} GB |")
    default, fp32, bf16, q4 = (median[n] for n in names[:4])
    print("the default path's banner: " + results[names[0]][-1]["banner"])
    print(f"default vs fp32: decode {default['decode'] / fp32['decode']:.2f}x, prompt {default['prompt'] / fp32['prompt']:.2f}x, "
          f"peak {default['peak'] / fp32['peak']:.2f}x")
    print(f"\ndefault vs llama.cpp Q4_K_M decode: {default['decode'] / q4['decode']:.2f}x (target >= 1.0); "
          f"default vs bf16 prompt: {default['prompt'] / bf16['prompt']:.2f}x (target >= 1.0); "
          f"default peak {default['peak'] / GIB:.2f} GiB (target <= 2.5)")
    print("command: .venv/bin/python benchmarks/cpu_speed.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
