"""Serving speed: the kit's server (`internlm-kit serve`) at 1, 4 and 8 concurrent streaming clients,
against bare `model.generate` in one process and against `transformers serve` with and without
`--continuous-batching`, on the same model, with the same requests, in the same run.

    .venv/bin/python benchmarks/serve_speed.py [--new-tokens 256] [--clients 1 4 8] [--threads 0]
    (the kit's server gets bare generate's thread count: torch's default, or --threads)
    .venv/bin/python benchmarks/serve_speed.py --stack 4.46.3 --clients 1 4   # on a profile's transformers

With --stack RELEASE the server and bare generate run in the test suite's cached venv of that
transformers release (tests/fixtures/venvs.py STACKS: 4.38.2, 4.46.3, 4.57.6; built if missing),
the model prepared here; `transformers serve` is left out there (4.x has none).

The model is the chat benchmark's "tiny but not trivial" shape (tests/fixtures/models.py: 8 layers,
hidden 512, random weights, fp32 on CPU), converted to the Llama layout so that all three load the
same folder, with the byte-fallback rows of its output head zeroed (`transformers serve` aborts a
stream whose byte tokens do not form UTF-8; the kit's server would not). Prompts are chosen so that
greedy decoding runs the full --new-tokens without an end-of-turn token (the end-of-turn rows of the
head are zeroed as well); every request is greedy with
max_tokens=--new-tokens, and the token counts servers report are checked.

Figures, per server and client count (median of --rounds):
  tok/s       all tokens received / wall seconds from the first request sent to the last reply done
              (for 1 client this is one reply's tokens / its wall time, as for bare generate)
  x bare      tok/s / bare generate's tokens/s (new tokens / wall of one generate call), bare
              measured in this process right before each server round (paired: the machine's
              other load changes by the minute, so only close-in-time runs compare)
  x 1-client  aggregate tok/s / the same server's 1-client tok/s
  TTFT p95    95th percentile over clients of the time to the first content chunk
Servers run one at a time as subprocesses on 127.0.0.1; clients are threads in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CANDIDATES = [
    "Please tell me a story about a small robot who learns to paint, with many details.",
    "Explain how a bicycle stays upright, step by step.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Describe the water cycle to a child in many sentences.",
    "List everything you would pack for a week of camping and why.",
    "What makes a good cup of tea? Give a long answer.",
    "Tell me about the history of printing in detail.",
    "Describe a busy market in the morning, with sounds and smells.",
    "How do trains work? Explain thoroughly.",
    "Write a recipe for bread with every step explained.",
    "Describe your ideal library, room by room.",
    "Explain why the sky is blue, at length.",
    "Tell a long fable about a fox and a crow.",
    "Describe a walk through a forest in autumn.",
    "How would you teach someone to swim? Be detailed.",
    "Write the opening chapter of an adventure novel.",
]


def messages(text: str) -> list[dict]:
    """Every server and bare generate get the same conversation: one user message, no system prompt
    (the kit's server runs with --system "", since by default it adds InternLM's, as LMDeploy does,
    and `transformers serve` adds none)."""
    return [{"role": "user", "content": text}]


def prepare_model(tmp: Path) -> Path:
    """The benchmark model, converted to Llama layout, byte rows of the output head zeroed."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import load_file, save_file

    from fixtures.models import build_bench_internlm2
    from setup_kit.convert import convert_checkpoint

    source = build_bench_internlm2(tmp / "bench-internlm2", max_position_embeddings=2048)
    dest = tmp / "bench-llama"
    convert_checkpoint(source, dest)
    sp = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model"))
    # End-of-turn rows too: random weights end replies early, and every reply must run full length.
    ends = json.loads((dest / "generation_config.json").read_text())["eos_token_id"]
    ends = ends if isinstance(ends, list) else [ends]
    byte_ids = torch.tensor([i for i in range(sp.get_piece_size()) if sp.is_byte(i)] + ends)
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][byte_ids] = 0.0
            save_file(tensors, str(shard), metadata={"format": "pt"})
    return dest


class Bare:
    """Bare `model.generate` in this process, and the prompts whose greedy reply runs all new_tokens."""

    def __init__(self, model_dir: Path, new_tokens: int, want: int):
        import torch

        from setup_kit.engines.native import load_model_and_tokenizer
        from setup_kit.serve.app import encode_chat

        self.model, tokenizer, info = load_model_and_tokenizer(model_dir, device="cpu", dtype="fp32")
        self.new_tokens = new_tokens
        eos = set(info.eos_token_ids)
        self.prompts = []
        for text in CANDIDATES:
            ids = torch.tensor([encode_chat(tokenizer, messages(text))])
            _, tokens = self._generate(ids, new_tokens)
            if len(tokens) == new_tokens and not eos & set(tokens):
                self.prompts.append(text)
            if len(self.prompts) == want:
                break
        if len(self.prompts) < want:
            raise SystemExit(f"only {len(self.prompts)} prompts run {new_tokens} tokens without end of turn")
        self.ids = torch.tensor([encode_chat(tokenizer, messages(self.prompts[0]))])

    def _generate(self, ids, n):
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      do_sample=False)
        return time.perf_counter() - started, out[0, ids.shape[1]:].tolist()

    def tok_s(self) -> float:
        return self.new_tokens / self._generate(self.ids, self.new_tokens)[0]

    def ttft(self) -> float:
        return self._generate(self.ids, 1)[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int, env: dict, log: Path) -> subprocess.Popen:
    import httpx

    out = open(log, "w")
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{argv[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{argv[0]} did not come up:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def one_stream(url: str, model: str, prompt: str, new_tokens: int, t0: float, result: dict) -> None:
    body = {"model": model, "messages": messages(prompt), "stream": True,
            "temperature": 0, "max_tokens": new_tokens, "stream_options": {"include_usage": True}}
    first, chunks, usage = None, 0, None
    with HTTP.stream("POST", url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"])
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            for choice in data.get("choices", []):
                if choice["delta"].get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
    result.update(ttft=first, done=time.perf_counter() - t0, tokens=usage if usage is not None else chunks)


# One client shared by all client threads, made before any clock starts: building an httpx client
# per request costs tens of milliseconds (its SSL context), which would land in every TTFT.
HTTP = None


def load_test(url: str, model: str, prompts: list[str], clients: int, new_tokens: int) -> dict:
    results = [{} for _ in range(clients)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_stream, args=(url, model, prompts[i], new_tokens, t0, results[i]))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any("done" not in r for r in results):
        raise SystemExit("a client failed")
    wall = max(r["done"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p95": p95,
            "tokens": [r["tokens"] for r in results]}


def measure_server(name, argv, port, model_name, env, log, bare, client_counts, new_tokens, rounds):
    """A server's figures; each round is paired with a bare generate run just before it, so a
    ratio compares measurements taken seconds apart (other load on the machine comes and goes)."""
    process = start(argv, port, env, log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        load_test(url, model_name, bare.prompts, 1, 16)  # warm-up
        figures = {}
        for n in client_counts:
            runs, bares = [], []
            for _ in range(rounds):
                bares.append(bare.tok_s())
                runs.append(load_test(url, model_name, bare.prompts, n, new_tokens))
            short = [t for run in runs for t in run["tokens"] if t != new_tokens]
            if short:
                print(f"  note: {name} at {n} clients returned replies of {short} tokens", file=sys.stderr)
            figures[n] = {"tok_s": statistics.median(r["tok_s"] for r in runs),
                          "bare_tok_s": statistics.median(bares),
                          "ttft_p95": statistics.median(r["ttft_p95"] for r in runs)}
            print(f"  {name:<40} {n} client(s): {figures[n]['tok_s']:7.1f} tok/s "
                  f"(bare just before: {figures[n]['bare_tok_s']:.1f})  "
                  f"TTFT p95 {figures[n]['ttft_p95']:.3f} s", file=sys.stderr, flush=True)
        return figures
    finally:
        stop(process)


def run_on_stack(args) -> int:
    """Prepare the model with this interpreter's test fixtures, then measure in the stack's venv."""
    from fixtures.venvs import stack_venv

    python = stack_venv(args.stack)
    with tempfile.TemporaryDirectory(prefix="serve-bench-stack-") as tmp:
        model_dir = prepare_model(Path(tmp))
        argv = [str(python), __file__, "--model-dir", str(model_dir), "--skip-transformers",
                "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds), "--threads", str(args.threads),
                "--clients", *map(str, args.clients)]
        version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        print(f"on transformers {version} ({python})", file=sys.stderr, flush=True)
        return subprocess.run(argv).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads everywhere (0: torch's default)")
    parser.add_argument("--skip-transformers", action="store_true", help="measure the kit's server only")
    parser.add_argument("--stack", metavar="RELEASE", help="run in the cached venv of this transformers release")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)  # prepared by the --stack parent
    args = parser.parse_args()
    if args.stack:
        return run_on_stack(args)

    import httpx
    import torch

    global HTTP
    HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env["INTERNLM_KIT_STATE_DIR"] = str(tmp / "state")
        os.environ["INTERNLM_KIT_STATE_DIR"] = env["INTERNLM_KIT_STATE_DIR"]
        model_dir = args.model_dir or prepare_model(tmp)
        print(f"model: {model_dir.name} (8 layers, hidden 512), CPU fp32, torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
        bare = Bare(model_dir, args.new_tokens, max(args.clients))
        bare_figures = {"tok_s": statistics.median(bare.tok_s() for _ in range(args.rounds)),
                        "ttft_p95": statistics.median(bare.ttft() for _ in range(args.rounds))}
        print(f"  {'bare model.generate':<40} 1 client(s): {bare_figures['tok_s']:7.1f} tok/s  "
              f"TTFT {bare_figures['ttft_p95']:.3f} s", file=sys.stderr, flush=True)
        servers = {}
        port = free_port()
        kit = [str(bin_dir / "internlm-kit"), "serve", "--model", str(model_dir), "--port", str(port),
               "--device", "cpu", "--dtype", "fp32", "--skip-checks", "--model-name", "bench", "--system", "",
               "--max-batch", str(max(args.clients))]
        # The same thread count as bare generate here: serve picks its own by default (the cores not
        # already busy), which would pair a 1-thread server with a 2-thread bare generate under load.
        kit += ["--threads", str(torch.get_num_threads())]
        servers["internlm-kit serve"] = measure_server(
            "internlm-kit serve", kit, port, "bench", env, tmp / "kit.log", bare, args.clients,
            args.new_tokens, args.rounds)
        if not args.skip_transformers:
            for label, extra in (("transformers serve", []),
                                 ("transformers serve --continuous-batching", ["--continuous-batching"])):
                port = free_port()
                argv = [str(bin_dir / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
                        "--port", str(port), "--device", "cpu", "--dtype", "float32", *extra]
                servers[label] = measure_server(label, argv, port, str(model_dir), env,
                                                tmp / f"{label.split()[-1]}.log", bare, args.clients,
                                                args.new_tokens, args.rounds)
        shutil.rmtree(tmp / "state", ignore_errors=True)

    print(f"\nServing speed, {args.new_tokens} greedy tokens per reply, median of {args.rounds} rounds "
          f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):\n")
    print("| server | clients | tok/s | bare tok/s (paired) | x bare | x its 1-client | TTFT p95 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| bare `model.generate` | 1 | {bare_figures['tok_s']:.1f} | | 1.00 | - | "
          f"{bare_figures['ttft_p95']:.3f} s |")
    for label, figures in servers.items():
        one = figures.get(1, {}).get("tok_s")
        for n, f in figures.items():
            ratio = f"{f['tok_s'] / one:.2f}" if one else "-"
            print(f"| {label} | {n} | {f['tok_s']:.1f} | {f['bare_tok_s']:.1f} | "
                  f"{f['tok_s'] / f['bare_tok_s']:.2f} | {ratio} | {f['ttft_p95']:.3f} s |")
    print(f"\ncommand: .venv/bin/python benchmarks/serve_speed.py {' '.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
