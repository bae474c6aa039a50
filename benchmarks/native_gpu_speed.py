"""Native engine decode speed at the real model's shape, eager vs --compile, beside the memory limit.

    .venv/bin/python benchmarks/native_gpu_speed.py [--new-tokens 256] [--runs 3] [--layers 24]

internlm2-chat-1_8b's shape (hidden 2048, 24 layers, 16 heads / 8 KV heads, intermediate 8192,
vocab 92544) with random weights in bf16 (fp16 below compute capability 8.0), built as an
InternLM2 folder on disk and loaded by the native engine (mapped onto transformers' Llama), then
decoded greedily through the engine's own loop: eager, then with the static cache +
torch.compile option. Beside them, the memory-bandwidth limit: weight bytes read per token divided
by the device-to-device copy bandwidth measured in the same run. End-of-turn tokens are ignored
so every run produces --new-tokens tokens. Without a CUDA GPU it says so and exits 0, unless
--device cpu (a smoke test; use --layers 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

REAL_SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=8192, max_position_embeddings=32768)


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes/s the device moves in a large copy (read + write counted)."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / min(times)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(engine, prompt: list[int], new_tokens: int, runs: int) -> tuple[float, float]:
    from setup_kit.engines.base import GenerationParams

    params = GenerationParams(max_new_tokens=new_tokens, greedy=True)
    list(engine.generate_tokens(prompt, params))  # warm-up (compiles, when compiled)
    rates, firsts = [], []
    for _ in range(runs):
        tokens = list(engine.generate_tokens(prompt, params))
        stats = engine.last_stats
        assert len(tokens) == new_tokens, stats
        rates.append(stats.tokens_per_second)
        firsts.append(stats.first_token_seconds)
    return statistics.median(rates), statistics.median(firsts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("native_gpu_speed: no CUDA GPU here; skipped (run it on a GPU machine).")
        return 0
    from fixtures.models import build_tiny_internlm2, grow_tokenizer_model, train_tokenizer_model
    from setup_kit.engines.native import NativeEngine, choose_device_dtype

    device, dtype, reason, gpu = choose_device_dtype(args.device, "auto" if args.device != "cpu" else "bf16")
    with tempfile.TemporaryDirectory(prefix="native-bench-") as tmp:
        os.environ.setdefault("INTERNLM_KIT_STATE_DIR", str(Path(tmp) / "state"))
        tokenizer_model = train_tokenizer_model(Path(tmp) / "tok")
        vocab = grow_tokenizer_model(tokenizer_model)
        folder = build_tiny_internlm2(Path(tmp) / "internlm2-1_8b-shape", **REAL_SHAPE,
                                      num_hidden_layers=args.layers, shards=2,
                                      dtype={"bf16": "bfloat16", "fp16": "float16"}.get(dtype, "float32"),
                                      tokenizer_model=tokenizer_model)
        engine = NativeEngine(folder, device=device, dtype=dtype)
    engine.eos_ids = set()  # random weights: never stop early
    messages = [{"role": "user", "content": "Tell me a long story about the sea. " * 4}]
    prompt = engine.encode_chat(messages)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    # Per token, every weight is read once except the embedding table (one row).
    read_bytes = weight_bytes - engine.model.get_input_embeddings().weight.numel() * 2
    bandwidth = copy_bandwidth(device)
    limit = bandwidth / read_bytes

    eager, eager_first = decode_rate(engine, prompt, args.new_tokens, args.runs)
    rows = [("eager (dynamic cache)", eager, eager_first)]
    if not args.no_compile:
        compiled = NativeEngine(folder, compile=True, model=engine.model, tokenizer=engine.tokenizer,
                                info=engine.info)
        compiled.eos_ids = set()
        rate, first = decode_rate(compiled, prompt, args.new_tokens, args.runs)
        rows.append(("static cache + torch.compile", rate, first))

    print(f"device: {gpu or device}, {dtype} ({reason}); {args.layers} layers at the 1.8B shape, "
          f"vocab {vocab}, {engine.info.parameters / 1e9:.2f}B parameters, "
          f"{weight_bytes / 1e9:.2f} GB of weights")
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy, median of {args.runs}")
    print(f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s -> limit "
          f"{limit:,.0f} tokens/s ({read_bytes / 1e9:.2f} GB read per token)")
    for name, rate, first in rows:
        print(f"{name:30s} {rate:8.1f} tokens/s  ({rate / limit:5.1%} of the limit), "
              f"first token {first * 1000:.1f} ms")
    print(f"command: .venv/bin/python benchmarks/native_gpu_speed.py --new-tokens {args.new_tokens} "
          f"--runs {args.runs} --layers {args.layers} --device {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
