"""The rehearsal, run by the TARGET interpreter: what an engine will do, on a miniature twin of a model folder.

Reads one JSON request on stdin: {"mode": "remote-code" | "native", "folder": DIR, "dtype": "auto" |
"bfloat16" | "float16" | "float32", "device_map": "auto" | "cpu" | ..., "imports": [probe items],
"timeout": seconds for the stream}. Prints one JSON answer on stdout (see `setup_kit.probe.rehearsal`).

The twin is the folder's own config.json with layers and widths shrunk (vocabulary, special token ids,
rope settings kept), its own tokenizer files and remote code, and random weights: no weight file of
the folder is read. `remote-code` does what the tutorial does (AutoTokenizer and AutoModelForCausalLM
with trust_remote_code, `chat`, then `stream_chat` consumed by the tutorial's loop); `native` loads the
twin through the kit's own load path and decodes one token. Stays valid on Python 3.8 (old targets).
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
SHRUNK = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


class Failed(Exception):
    """A stage failed; carries what the answer reports."""

    def __init__(self, stage, exc=None, message=None, remote_files=()):
        Exception.__init__(self, message or str(exc))
        self.stage, self.exc, self.message, self.remote_files = stage, exc, message, remote_files


def describe(exc, remote_files=()):
    """type, message, where (the innermost frame in the remote code, else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    remote = [f for f in frames if os.path.basename(f.filename) in remote_files]
    frame = (remote or frames or [None])[-1]
    where = "{0}:{1} in {2}".format(os.path.basename(frame.filename), frame.lineno, frame.name) if frame else ""
    code = (frame.line or "").strip() if frame else ""
    tail = ["{0}:{1} in {2}".format(os.path.basename(f.filename), f.lineno, f.name) for f in frames[-6:]]
    return {"type": type(exc).__name__, "message": str(exc)[:800], "where": where, "code": code,
            "in_remote_code": bool(remote), "frames": tail}


def twin_config(config):
    twin = dict(config)
    heads, kv = config.get("num_attention_heads", 4), config.get("num_key_value_heads")
    twin.update(SHRUNK)
    if kv is not None:
        twin["num_key_value_heads"] = 4 if kv >= heads else 2  # keep grouped-query attention grouped
    twin.pop("quantization_config", None)
    twin["torch_dtype"] = config.get("torch_dtype", "float32")
    return twin


def make_twin(folder, dest, weights=False):
    """dest/twin: config shrunk, tokenizer files and *.py copied; returns (path, config, remote .py names)."""
    twin = os.path.join(dest, "twin")
    os.makedirs(twin)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    remote = []
    for name in sorted(os.listdir(folder)):
        source = os.path.join(folder, name)
        if name in TOKENIZER_FILES or (name.endswith(".py") and os.path.isfile(source)):
            shutil.copyfile(source, os.path.join(twin, name))
            if name.endswith(".py"):
                remote.append(name)
    small = twin_config(config)
    with open(os.path.join(twin, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(small, handle)
    return twin, small, remote


def internlm2_shapes(config):
    """The hub's tensor names and shapes of an InternLM2 checkpoint (setup_kit.convert.expected_shapes)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim, inter, vocab = hidden // heads, config["intermediate_size"], config["vocab_size"]
    shapes = {"model.tok_embeddings.weight": (vocab, hidden), "output.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    per_layer = {"attention.wqkv.weight": ((heads + 2 * kv_heads) * head_dim, hidden),
                 "attention.wo.weight": (hidden, heads * head_dim),
                 "feed_forward.w1.weight": (inter, hidden), "feed_forward.w3.weight": (inter, hidden),
                 "feed_forward.w2.weight": (hidden, inter),
                 "attention_norm.weight": (hidden,), "ffn_norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({"model.layers.{0}.{1}".format(i, k): v for k, v in per_layer.items()})
    if config.get("bias"):
        for i in range(config["num_hidden_layers"]):
            shapes["model.layers.{0}.attention.wqkv.bias".format(i)] = (shapes[
                "model.layers.{0}.attention.wqkv.weight".format(i)][0],)
            shapes["model.layers.{0}.attention.wo.bias".format(i)] = (hidden,)
    return shapes


def write_twin_weights(twin, config):
    """Random weights for the twin, written as the folder's own layout would be (no remote code runs)."""
    import torch

    if config.get("model_type") != "internlm2":
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(twin)).save_pretrained(twin)
        return
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(shape) if name.endswith("norm.weight") else
               (torch.zeros(shape) if name.endswith(".bias") else torch.randn(shape, generator=generator) * 0.02)
               for name, shape in internlm2_shapes(config).items()}
    save_file(tensors, os.path.join(twin, "model.safetensors"), metadata={"format": "pt"})


def check_chat_tokens(tokenizer, vocab_size):
    """A problem (str) when the chat tokens' ids are past the model's vocabulary, else None."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}
    encoded = tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    bad = {t: i for t, i in ids.items() if i is None or i >= vocab_size}
    beyond = [i for i in encoded if i >= vocab_size]
    if not bad and not beyond:
        return None, ids
    shown = ", ".join("{0}={1}".format(t, i) for t, i in sorted(bad.items(), key=lambda x: str(x[1])))
    return ("the tokenizer gives chat tokens ids at or past the model's vocabulary of {0} ({1}; "
            "len(tokenizer) {2}): the model's embedding table has no row for them".format(
                vocab_size, shown or "ids " + ", ".join(map(str, beyond[:6])), len(tokenizer))), ids


def run_imports(items):
    import importlib.util

    results = []
    for item in items:
        try:
            if "module" in item:
                if importlib.util.find_spec(item["module"]) is None:
                    raise ModuleNotFoundError("No module named '{0}'".format(item["module"]))
            else:
                exec(item["statement"], {})
            results.append(dict(item, ok=True, error=""))
        except BaseException as exc:
            results.append(dict(item, ok=False, error="{0}: {1}".format(type(exc).__name__, exc).strip()[:500]))
    return results


def stream_like_tutorial(model, tokenizer, timeout, remote):
    """The tutorial's loop over stream_chat, in a thread: a producer-thread exception or a hang is a failure."""
    errors, done = [], threading.Event()
    hook = getattr(threading, "excepthook", None)

    def excepthook(args):
        errors.append(args.exc_value)
        done.set()

    threading.excepthook = excepthook
    pieces = []

    def consume():
        try:
            length = 0
            for response, _history in model.stream_chat(tokenizer, "hi", history=[], max_new_tokens=2,
                                                        do_sample=False):
                pieces.append(response[length:])
                length = len(response)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    finished = done.wait(timeout)
    if hook is not None:
        threading.excepthook = hook
    if errors:
        exc = errors[0]
        hang = consumer.is_alive()
        raise Failed("stream_chat", exc, remote_files=remote,
                     message=("stream_chat's producer thread raised; the tutorial's loop never sees it and waits "
                              "forever (a hang)" if hang else None))
    if not finished:
        raise Failed("stream_chat", message="stream_chat produced nothing within {0:.0f}s and raised nothing: the "
                     "tutorial's loop hangs".format(timeout))
    return "".join(pieces)


def rehearse_remote_code(request, twin, config, remote, answer):
    stage = "import transformers"
    try:
        import torch  # noqa: F401
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        answer["transformers"] = transformers.__version__
        stage = "AutoTokenizer.from_pretrained"
        tokenizer = AutoTokenizer.from_pretrained(twin, trust_remote_code=True)
        answer["tokenizer_class"] = type(tokenizer).__name__
        answer["token_problem"], answer["chat_token_ids"] = check_chat_tokens(tokenizer, config["vocab_size"])
        stage = "twin weights"
        write_twin_weights(twin, config)
        stage = "AutoModelForCausalLM.from_pretrained"
        dtype = request.get("dtype") or "auto"
        kwargs = {"trust_remote_code": True, "torch_dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if request.get("device_map"):
            kwargs["device_map"] = request["device_map"]
        model = AutoModelForCausalLM.from_pretrained(twin, **kwargs).eval()
        stage = "chat"
        with torch.no_grad():
            model.chat(tokenizer, "hi", history=[], max_new_tokens=2, do_sample=False)
        stage = "stream_chat"
        with torch.no_grad():
            stream_like_tutorial(model, tokenizer, float(request.get("timeout") or 30), remote)
    except Failed:
        raise
    except BaseException as exc:
        raise Failed(stage, exc, remote_files=remote)


def rehearse_native(request, twin, config, answer):
    stage = "import the kit"
    try:
        import torch

        from setup_kit.engines.native import NativeEngine

        stage = "twin weights"
        write_twin_weights(twin, config)
        stage = "native load"
        device = "cpu" if request.get("device_map") == "cpu" else "auto"
        engine = NativeEngine(twin, device=device, dtype=request.get("dtype") or "auto")
        stage = "chat tokens"
        answer["token_problem"], answer["chat_token_ids"] = check_chat_tokens(engine.tokenizer, config["vocab_size"])
        stage = "one decode step"
        prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
        with torch.no_grad():
            engine.model(torch.tensor([prompt], device=engine.model.device))
    except BaseException as exc:
        raise Failed(stage, exc)


def main():
    request = json.loads(sys.stdin.read())
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # whatever the remote code prints must not spoil the answer
    started = time.time()
    answer = {"mode": request["mode"], "passed": False, "stage": "", "exception": None, "token_problem": None}
    if request.get("imports"):
        answer["imports"] = run_imports(request["imports"])
    scratch = tempfile.mkdtemp(prefix="internlm-kit-rehearsal-")
    remote = ()
    try:
        os.environ.setdefault("HF_MODULES_CACHE", os.path.join(scratch, "modules"))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        twin, config, remote = make_twin(request["folder"], scratch)
        if request["mode"] == "remote-code":
            rehearse_remote_code(request, twin, config, remote, answer)
        else:
            rehearse_native(request, twin, config, answer)
        answer["passed"] = answer["token_problem"] is None
        if answer["token_problem"]:
            answer["stage"] = "chat tokens"
    except Failed as failed:
        answer["stage"] = failed.stage
        if failed.exc is not None:
            answer["exception"] = describe(failed.exc, failed.remote_files)
        if failed.message:
            answer["note"] = failed.message
    except BaseException as exc:  # the twin itself could not be made
        answer["stage"], answer["exception"] = "twin", describe(exc, remote)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if answer.get("exception"):  # name the user's folder, not the twin that is already gone
        twin_dir = os.path.join(scratch, "twin")
        for key in ("message", "code"):
            answer["exception"][key] = answer["exception"][key].replace(twin_dir, request["folder"])
    answer["seconds"] = round(time.time() - started, 3)
    real_stdout.write(json.dumps(answer))
    real_stdout.flush()
    os._exit(0)  # a hung producer thread must not keep the process alive


if __name__ == "__main__":
    main()
