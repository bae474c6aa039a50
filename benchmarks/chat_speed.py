"""Chat loop speed: the code `internlm-kit chat` runs for a reply (Session.send -> NativeEngine
decode loop -> incremental detokenization -> the text callback) against a bare greedy
`model.generate` on the same loaded model and the same prompt ids, in the same run.

    .venv/bin/python benchmarks/chat_speed.py [--new-tokens 256] [--runs 5] [--device cpu]

The model is the "tiny but not trivial" benchmark shape of tests/fixtures/models.py (8 layers,
hidden 512, 8 heads / 4 KV heads, random weights, fp32 on CPU), an InternLM2 folder mapped onto
transformers' Llama at load. End-of-turn tokens are ignored in both (the engine's eos set is
emptied; generate gets min_new_tokens), so both produce exactly --new-tokens tokens, and the two
token streams are checked to be identical. Runs alternate which goes first; figures are medians.
tokens/s = new tokens / wall seconds of the whole reply; time to first token for generate is a
run with max_new_tokens=1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fixtures.models import BENCH_SHAPE, build_bench_internlm2  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer in detail."
USER = "Please tell me a story about a small robot who learns to paint, with many details."


def chat_loop_run(session, new_tokens: int) -> dict:
    """One reply through the chat's own code path; the sink stands in for the terminal."""
    session.reset()
    shown = []
    started = time.perf_counter()
    result = session.send(USER, on_text=shown.append)
    wall = time.perf_counter() - started
    stats = result.stats
    assert stats.completion_tokens == new_tokens, stats
    return {"wall": wall, "ttft": stats.first_token_seconds, "tokens": stats.completion_tokens,
            "text": "".join(shown)}


def generate_run(model, input_ids, new_tokens: int) -> tuple[float, list[int]]:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    wall = time.perf_counter() - started
    return wall, out[0, input_ids.shape[1]:].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        os.environ["INTERNLM_KIT_STATE_DIR"] = str(Path(tmp) / "state")
        from setup_kit.decoding import IncrementalDecoder
        from setup_kit.engines.base import GenerationParams
        from setup_kit.engines.native import NativeEngine, load_model_and_tokenizer
        from setup_kit.session import Session

        model_dir = build_bench_internlm2(Path(tmp) / "bench-internlm2",
                                          max_position_embeddings=4096)
        model, tokenizer, info = load_model_and_tokenizer(model_dir, args.device, args.dtype)
        engine = NativeEngine(model_dir, model=model, tokenizer=tokenizer, info=info)
        engine.eos_ids = set()  # always the full --new-tokens, like min_new_tokens below
        session = Session(engine, system=SYSTEM,
                          params=GenerationParams(max_new_tokens=args.new_tokens, greedy=True))
        prompt = engine.encode_chat(session.messages(USER))
        input_ids = torch.tensor([prompt], device=model.device)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        # warm up both paths (first calls allocate and pick kernels)
        chat_loop_run(session, args.new_tokens)
        generate_run(model, input_ids, args.new_tokens)

        chat, gen, gen_ttft = [], [], []
        for run in range(args.runs):
            order = ("chat", "generate") if run % 2 == 0 else ("generate", "chat")
            for which in order:
                if which == "chat":
                    chat.append(chat_loop_run(session, args.new_tokens))
                else:
                    wall, ids = generate_run(model, input_ids, args.new_tokens)
                    gen.append(wall)
                    gen_ttft.append(generate_run(model, input_ids, 1)[0])

        # the same tokens: the chat loop's text is the incremental decoding of generate's ids
        decoder = IncrementalDecoder(tokenizer)
        expected = decoder.extend(ids) + decoder.flush()
        assert chat[-1]["text"] == expected, "chat loop and generate produced different tokens"

    chat_tps = statistics.median(args.new_tokens / r["wall"] for r in chat)
    gen_tps = statistics.median(args.new_tokens / w for w in gen)
    chat_ttft = statistics.median(r["ttft"] for r in chat)
    ttft = statistics.median(gen_ttft)
    shape = ", ".join(f"{k} {v}" for k, v in BENCH_SHAPE.items() if k != "shards")
    print(f"model: InternLM2 layout, {shape}, {info.parameters / 1e6:.1f}M parameters, "
          f"{info.device} {info.dtype}, torch threads {torch.get_num_threads()}")
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy, "
          f"median of {args.runs} runs")
    print(f"{'':24}{'tokens/s':>10}{'first token':>14}")
    print(f"{'chat loop (Session)':24}{chat_tps:10.1f}{chat_ttft * 1000:11.1f} ms")
    print(f"{'bare model.generate':24}{gen_tps:10.1f}{ttft * 1000:11.1f} ms")
    print(f"ratio chat / generate: {chat_tps / gen_tps:.3f} tokens/s (target >= 0.95), "
          f"first token {chat_ttft / ttft:.2f}x")
    print("command: .venv/bin/python benchmarks/chat_speed.py " + " ".join(sys.argv[1:]))
    return 0 if chat_tps / gen_tps >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
