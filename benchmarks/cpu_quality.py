"""What the CPU formats cost in quality: top-1 agreement with bf16 and the mean KL divergence from
bf16's next-token distribution, over 256 teacher-forced positions, per format, on a model whose
weights are trained (random weights give nearly flat distributions, where any noise flips the top
token and KL says little).

    .venv/bin/python benchmarks/cpu_quality.py [--steps 300] [--positions 256]

The model: the tests' tiny InternLM2 folder grown to hidden 256, 4 layers, 4 heads / 2 KV heads,
intermediate 768 (every matmul's input a multiple of int4's group of 64), converted to the Llama
layout by `internlm-kit convert`'s own code, then trained for --steps (seeded: the same model every
run) on English text that ships with Python (pydoc's topic help, `pydoc_data.topics`). Each format is loaded the way `chat --dtype FMT`
loads it (NativeEngine, quantized cache included) and fed the same held-out text.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=768)
FORMATS = ("fp32", "int8", "int4")


def texts() -> tuple[str, str]:
    """(training text, held-out text): pydoc's topics, split by topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(0).shuffle(names)
    held = names[:6]
    return ("\n\n".join(topics[n] for n in names[6:]), "\n\n".join(topics[n] for n in held))


def train(folder: Path, ids: list[int], steps: int, seq: int = 96, batch: int = 8) -> tuple[float, float]:
    """Train the Llama folder's weights in place; (seconds, last loss)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.tensor(ids)
    rng = random.Random(0)
    started, loss = time.perf_counter(), float("nan")
    for _ in range(steps):
        starts = [rng.randrange(0, len(data) - seq - 1) for _ in range(batch)]
        x = torch.stack([data[s:s + seq] for s in starts])
        out = model(input_ids=x, labels=x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        loss = float(out.loss)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return time.perf_counter() - started, loss


def logits_of(folder: Path, fmt: str, ids: list[int]):
    import torch

    from setup_kit.engines.native import NativeEngine

    engine = NativeEngine(folder, device="cpu", dtype=fmt)
    with torch.inference_mode():
        out = engine.model(torch.tensor([ids])).logits[0].float()
    engine.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (batches of 8 x 96 tokens)")
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads mostly wait on each other)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cpu-quality-") as tmp:
        tmp = Path(tmp)
        os.environ["INTERNLM_KIT_STATE_DIR"] = str(tmp / "state")
        from fixtures.models import build_tiny_internlm2

        from setup_kit.convert import convert_checkpoint
        from setup_kit.engines.native import load_model_and_tokenizer

        source = build_tiny_internlm2(tmp / "internlm2", **SHAPE, max_position_embeddings=1024, shards=1)
        folder = tmp / "trained-llama"
        convert_checkpoint(source, folder)
        _, tokenizer, _ = load_model_and_tokenizer(folder, device="cpu", dtype="fp32")
        training, held_out = texts()
        seconds, loss = train(folder, tokenizer.encode(training, add_special_tokens=False), args.steps)
        ids = tokenizer.encode(held_out, add_special_tokens=False)[: args.positions]
        reference = logits_of(folder, "bf16", ids)
        ref_log = torch.log_softmax(reference, dim=-1)
        ref_top = reference.argmax(-1)
        held_loss = float(torch.nn.functional.cross_entropy(reference[:-1], torch.tensor(ids[1:])))
        rows = []
        for fmt in FORMATS:
            logits = logits_of(folder, fmt, ids)
            log = torch.log_softmax(logits, dim=-1)
            agreement = float((logits.argmax(-1) == ref_top).float().mean())
            kl = float((ref_log.exp() * (ref_log - log)).sum(-1).mean())
            rows.append((fmt, agreement, kl))

    print(f"trained {args.steps} steps ({seconds:.0f} s) on pydoc's topics, last training loss {loss:.2f}, "
          f"held-out loss (bf16) {held_loss:.2f}; model {', '.join(f'{k} {v}' for k, v in SHAPE.items())}, "
          f"vocab {len(tokenizer)}; {len(ids)} teacher-forced positions of held-out text")
    print("| format | top-1 agreement with bf16 | mean KL(bf16 ‖ format), nats |")
    print("| --- | ---: | ---: |")
    for fmt, agreement, kl in rows:
        print(f"| {fmt} | {agreement:.1%} | {kl:.4f} |")
    print("command: .venv/bin/python benchmarks/cpu_quality.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
