"""The native engine: InternLM2 weights on transformers' own Llama implementation, no remote code.

An InternLM2 folder is mapped in memory at load time (the same streamed mapping `convert` writes
to disk), not through a cached conversion: that would keep a second 3.8 GB copy of the model on
disk and need invalidating when the folder changes, and it would not load any faster, since both
read every weight once. Only the tokenizer is cached (under `state_dir()/tokenizers/`): building it
from sentencepiece takes seconds for the real 92544 pieces and the result is a few MB.

Generation is a plain decode loop over the KV cache (no thread, no streamer queue): one forward per
token, sampling on the device, one host sync to read the token, incremental detokenization.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from setup_kit import dtypes
from setup_kit.decoding import IncrementalDecoder
from setup_kit.engines import compat, quant
from setup_kit.engines.base import GenerationParams, GenerationStats, Message
from setup_kit.errors import KitError, ModelFolderError, UsageError
from setup_kit.stop_strings import StopStrings

DTYPE_NAMES = dtypes.TORCH_NAMES
FORMATS = ("auto", *DTYPE_NAMES, *quant.QUANT_FORMATS)  # what --dtype takes on the native engine
CHAT_END_TOKENS = ("<|im_end|>",)


@dataclass
class LoadInfo:
    """What was loaded, where, and why this device and dtype."""

    model_dir: Path
    layout: str  # "internlm2" (mapped at load) or "llama"
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # the weights' format: "bf16" | "fp16" | "fp32" | "int8" | "int4"
    reason: str  # why this device/dtype, for the banner
    parameters: int = 0
    load_seconds: float = 0.0
    context_window: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    gpu_name: str = ""


# --- device and dtype ------------------------------------------------------------------------

def choose_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, str, str, str]:
    """(device, dtype, reason, gpu name) from the user's choice and what the machine has.

    bf16 only on compute capability >= 8.0 (`torch.cuda.is_bf16_supported()` says True on older
    GPUs through emulation, so the capability itself is checked); fp16 on older GPUs; fp32 on CPU
    unless bf16 is asked for.
    """
    import torch

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda.", "Pick one, e.g. --device cpu.")
    if dtype not in ("auto", *DTYPE_NAMES):
        raise UsageError(f"--dtype {dtype!r} is not one of auto, bf16, fp16, fp32.", "Pick one, e.g. --dtype fp32.")
    has_cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not has_cuda:
        raise KitError(f"--device {device} was asked for, but torch sees no usable CUDA GPU "
                       f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}).",
                       "Run `internlm-kit doctor` to see why, or use --device cpu.")
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        if dtype == "fp16":
            raise UsageError("fp16 on the CPU is not supported by the native engine (many kernels "
                             "are missing or very slow).", "Use --dtype fp32 (default) or --dtype bf16 on CPU.")
        if dtype != "auto":
            return device, dtype, f"CPU: {dtype} as asked", ""
        if quant.native_bf16():
            return device, "bf16", "CPU with native bf16 (AVX512-BF16/AMX): bf16", ""
        return device, "fp32", "CPU without native bf16: fp32", ""
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    capable = (major, minor) >= (8, 0)
    if dtype == "bf16" and not capable:
        raise KitError(f"bf16 needs a GPU of compute capability 8.0 or newer; {name} is {major}.{minor}.",
                       "Use --dtype fp16 (or leave --dtype auto, which picks it).")
    if dtype == "auto":
        dtype = "bf16" if capable else "fp16"
        reason = f"{name} (compute {major}.{minor}): {'bf16' if capable else 'fp16, no native bf16'}"
    else:
        reason = f"{name} (compute {major}.{minor}): {dtype} as asked"
    return device, dtype, reason, name


def choose_format(device: str = "auto", dtype: str = "auto") -> tuple[str, str, str | None, str, str]:
    """(device, compute dtype, quantized format or None, reason, gpu name).

    On the CPU, `auto` is int4 weights (the fewest bytes read per token, and the one format within
    2.5 GiB at the 1.8B shape; see quant.py), int8 where torch lacks the int4 kernels; int8/int4 are
    CPU formats only.
    """
    if dtype in quant.QUANT_FORMATS:
        if device.startswith("cuda"):
            raise UsageError(f"--dtype {dtype} is a CPU format of the native engine.",
                             "On a GPU use --dtype auto, bf16 or fp16; or add --device cpu.")
        if dtype == "int8" and not quant.int8_kernel_available():
            raise KitError("--dtype int8 needs torch's fbgemm kernels, which this torch build lacks.",
                           "Use --dtype int4 or bf16.")
        if dtype == "int4" and not quant.int4_kernel_available():
            raise KitError("--dtype int4 needs torch's CPU int4 kernels (torch 2.6 or later).",
                           "Use --dtype int8 or bf16, or a newer torch.")
        compute = quant.compute_dtype(dtype)
        return "cpu", compute, dtype, f"CPU: {dtype} weights as asked, {compute} activations", ""
    if dtype not in FORMATS:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(FORMATS)}.", "Pick one, e.g. --dtype int8.")
    device, chosen, reason, gpu = choose_device_dtype(device, dtype)
    if device == "cpu" and dtype == "auto":
        for fmt, available in (("int4", quant.int4_kernel_available), ("int8", quant.int8_kernel_available)):
            if available():
                compute = quant.compute_dtype(fmt)
                return (device, compute, fmt, f"CPU: {fmt} weights by default (a quarter of fp32's memory; --dtype fp32 for full precision), "
                        f"{compute} activations", "")
    return device, chosen, None, reason, gpu


# --- loading ---------------------------------------------------------------------------------

def load_model_and_tokenizer(model_dir, device: str = "auto", dtype: str = "auto"):
    """(LlamaForCausalLM, tokenizer, LoadInfo) for an InternLM2 folder or a Llama-layout folder."""
    from setup_kit.modelfolder import open_model_folder

    started = time.perf_counter()
    folder = open_model_folder(model_dir)
    device, dtype, fmt, reason, gpu = choose_format(device, dtype)
    tokenizer = _load_tokenizer(folder.path)  # first: a folder that is not a chat model fails fast
    layout = "internlm2" if folder.model_type == "internlm2" else "llama"
    if fmt is not None:
        model = _load_quantized(folder.path, folder.config, layout, fmt, dtype)
        dtype = fmt
    elif layout == "internlm2":
        model = _load_internlm2(folder.path, folder.config, device, dtype)
    else:
        model = _load_llama(folder.path, device, dtype)
    compat.fit_to_tokens(model, folder.config.get("max_position_embeddings", model.config.max_position_embeddings))
    model.eval()
    _quiet_known_noise()
    _check_vocab(tokenizer, model, folder.path)
    eos = eos_token_ids(model, tokenizer)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    info = LoadInfo(model_dir=folder.path, layout=layout, device=device, dtype=dtype, reason=reason,
                    parameters=quant.weight_count(model),
                    load_seconds=time.perf_counter() - started,
                    context_window=int(model.config.max_position_embeddings),
                    eos_token_ids=eos, gpu_name=gpu)
    return model, tokenizer, info


# transformers' own warnings that fire on every chat with a correctly loaded model and need nothing
# from the user: (logger, text it contains, why it is noise).
KNOWN_NOISE = [
    ("transformers.models.llama.modeling_llama", "`seq_len` argument is deprecated",
     "4.38's dynamic RoPE passes the argument it deprecates to itself"),
]


class _DropKnownNoise(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_known_noise() -> None:
    for name, text, _why in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.text == text for f in logger.filters):
            logger.addFilter(_DropKnownNoise(text))


def torch_dtype_for(dtype: str):
    """The torch dtype for one of the kit's names (bf16, fp16, fp32)."""
    import torch

    return getattr(torch, DTYPE_NAMES[dtype])


def _load_internlm2(path: Path, config: dict, device: str, dtype: str):
    """Build an empty Llama model and fill it from the InternLM2 shards, one tensor at a time."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from setup_kit.convert import (check_internlm2_config, check_tensors, iter_llama_tensors,
                                   list_source_tensors, llama_config)

    check_internlm2_config(config, path)
    check_tensors(path, config, list_source_tensors(path))
    llama = LlamaConfig(**llama_config(config, DTYPE_NAMES[dtype]))
    # Parameters on the meta device; buffers (RoPE, 4.38's mask) real, on the CPU.
    with init_empty_weights(), compat.small_mask_buffer(llama):
        model = LlamaForCausalLM(llama)
    torch_dtype = torch_dtype_for(dtype)
    for name, tensor in iter_llama_tensors(path, config, torch_dtype):
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=torch_dtype)
    model.to(device)  # the buffers
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _load_quantized(path: Path, config: dict, layout: str, fmt: str, dtype: str):
    """An empty Llama model filled from the folder's quantized cache, made first if need be."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from setup_kit.convert import check_internlm2_config, check_tensors, list_source_tensors, llama_config

    if layout == "internlm2":
        check_internlm2_config(config, path)
        check_tensors(path, config, list_source_tensors(path))
        llama = LlamaConfig(**llama_config(config, DTYPE_NAMES[dtype]))
    else:
        llama = LlamaConfig.from_pretrained(str(path))
        llama.torch_dtype = DTYPE_NAMES[dtype]
    where = quant.valid_cache(path, fmt)
    if where is None:
        where = _build_quantized_cache(path, config, layout, fmt, llama)
    with init_empty_weights(), compat.small_mask_buffer(llama):
        model = LlamaForCausalLM(llama)
    try:
        quant.install(model, where, fmt, torch_dtype_for(dtype))
    except Exception as exc:  # a chunk damaged after its size was checked: make the cache again
        logging.getLogger(__name__).warning("quantized cache %s unreadable (%s): rebuilding", where, exc)
        where = _build_quantized_cache(path, config, layout, fmt, llama)
        with init_empty_weights(), compat.small_mask_buffer(llama):
            model = LlamaForCausalLM(llama)
        quant.install(model, where, fmt, torch_dtype_for(dtype))
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelFolderError(f"{path} lacks weights the model needs: {', '.join(left[:5])}",
                               f"internlm-kit doctor --model {path}")
    model.to("cpu")  # the buffers
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _build_quantized_cache(path: Path, config: dict, layout: str, fmt: str, llama) -> Path:
    """Quantize the folder, streamed tensor by tensor, with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tensors, total = _llama_tensor_stream(path, config, layout, llama)
    where = quant.cache_dir(path, fmt)
    console = Console(stderr=True)
    columns = (TextColumn(f"quantizing {path.name} to {fmt} (once; cached in {where})"), BarColumn(),
               MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("quantize", total=total)
        where = quant.build_cache(path, fmt, tensors, total,
                                  progress=lambda done, _total: bar.update(task, completed=done))
    quant.release_freed_memory()
    return where


def _llama_tensor_stream(path: Path, config: dict, layout: str, llama):
    """(iterator of Llama-named tensors, how many), one tensor in memory at a time; a tied output
    layer is streamed as its own `lm_head.weight` so it gets quantized like the others."""
    if layout == "internlm2":
        from setup_kit.convert import map_tensor

        source = ((new_name, new) for name, tensor in quant.read_tensors(path)
                  for new_name, new in map_tensor(name, tensor, config))
    else:
        source = quant.read_tensors(path)
    total = 3 + 9 * int(llama.num_hidden_layers)
    tied = bool(getattr(llama, "tie_word_embeddings", False))

    def stream():
        for name, tensor in source:
            yield name, tensor
            if tied and name == "model.embed_tokens.weight":
                yield "lm_head.weight", tensor
    return stream(), total


def _load_llama(path: Path, device: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
        with compat.small_mask_buffer(config):
            model = AutoModelForCausalLM.from_pretrained(str(path), config=config,
                                                         **compat.dtype_kwarg(torch_dtype_for(dtype)))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"transformers could not load {path}: {exc}",
                               f"internlm-kit doctor --model {path}") from exc
    return model.to(device)


def _load_tokenizer(path: Path):
    from setup_kit.locations import state_dir
    from setup_kit.tokenizer_files import load_tokenizer

    tokenizer = load_tokenizer(path, cache_root=state_dir() / "tokenizers")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelFolderError(
            f"{path} has no chat template in its tokenizer files, so it is not a chat model "
            "(a base model cannot hold a conversation).",
            f"Use a chat model such as internlm/internlm2-chat-1_8b; internlm-kit doctor --model {path}")
    return tokenizer


def _check_vocab(tokenizer, model, path: Path) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelFolderError(
            f"the tokenizer of {path} has {len(tokenizer)} tokens but the model only {rows} "
            "embeddings: the chat tokens would get ids past the table.",
            f"Convert the folder again with internlm-kit convert, or run internlm-kit doctor --model {path}")


def eos_token_ids(model, tokenizer) -> list[int]:
    """`</s>` and `<|im_end|>`, plus whatever generation_config.json names."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    for value in ([configured] if isinstance(configured, int) else list(configured or [])):
        ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in CHAT_END_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))


# --- generation ------------------------------------------------------------------------------

class Sampler:
    """Next-token choice from logits [1, vocab] on the device: greedy, or temperature + top-p."""

    def __init__(self, params: GenerationParams, device):
        import torch

        self.greedy = params.greedy or params.temperature <= 0
        self.temperature = max(params.temperature, 1e-5)
        self.top_p = params.top_p
        self.generator = None
        if params.seed is not None and not self.greedy:
            self.generator = torch.Generator(device=device).manual_seed(int(params.seed))

    def __call__(self, logits):
        import torch

        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if 0 < self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return order.gather(-1, choice).squeeze(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class NativeEngine:
    """`Engine` over `load_model_and_tokenizer`. Pass `model`/`tokenizer`/`info` to share a load."""

    name = "native"

    def __init__(self, model_dir, device: str = "auto", dtype: str = "auto", *,
                 compile: bool = False, model=None, tokenizer=None, info: LoadInfo | None = None):
        if model is None:
            model, tokenizer, info = load_model_and_tokenizer(model_dir, device, dtype)
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.context_window = info.context_window
        self.eos_ids = set(info.eos_token_ids)
        self.compiled = False
        self._stats = GenerationStats()
        self._lock = threading.Lock()
        if compile:
            self._enable_compile()

    # -- Engine --

    def describe(self) -> str:
        info = self.info
        where = f"{info.device} {info.dtype}" + (f" ({info.reason})" if info.reason else "")
        if info.device == "cpu":
            where += f" · {quant.threads_note()}"
        mapped = ", mapped from InternLM2" if info.layout == "internlm2" else ""
        compiled = ", static cache + torch.compile" if self.compiled else ""
        return (f"native engine · {where} · {info.model_dir.name} "
                f"({info.parameters / 1e6:,.1f}M parameters{mapped}{compiled})")

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ending with the assistant prefix.
        The server's encoding (one implementation): control tokens come only from the template, so
        `<|im_end|>` typed in a message stays text in chat as it does in serve."""
        from setup_kit.serve.prompt import encode_chat

        return encode_chat(self.tokenizer, messages)

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        return len(self.encode_chat(messages))

    @property
    def last_stats(self) -> GenerationStats:
        return self._stats

    def stream(self, messages: list[Message], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        prompt = self.encode_chat(messages)
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopStrings(tuple(params.stop))
        for token in self.generate_tokens(prompt, params, cancel):
            text, hit = stops.feed(decoder.push(token))
            if text:
                yield text
            if hit:
                self._stats.stop = "eos"
                return
        text, hit = stops.feed(decoder.flush())
        if not hit:
            text += stops.flush()[0]
        if text:
            yield text

    def close(self) -> None:
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # -- the decode loop --

    def generate_tokens(self, prompt_ids: list[int], params: GenerationParams,
                        cancel: threading.Event | None = None) -> Iterator[int]:
        """Yield new token ids (end-of-turn tokens not included); `last_stats` says why it stopped."""
        import torch

        if self.model is None:
            raise KitError("The native engine was closed.", "Start a new chat.")
        started = time.perf_counter()
        stats = self._stats = GenerationStats(prompt_tokens=len(prompt_ids))
        room = self.context_window - len(prompt_ids)
        limit = max(0, min(params.max_new_tokens, room))
        if limit == 0:
            stats.stop = "length"
            return
        device = self.model.device
        sampler = Sampler(params, device)
        inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        position = torch.arange(len(prompt_ids), device=device)
        stats.stop = "length"
        # Replies with their own dynamic caches may interleave; the one static cache may not.
        if self.compiled and not self._lock.acquire(blocking=False):
            raise KitError("The compiled native engine is already generating a reply.",
                           "Finish or cancel that reply first (or run without --compile).")
        try:
            with torch.inference_mode():  # (a static cache is made and reset in inference mode)
                cache = self._new_cache(len(prompt_ids) + limit)
            yield from self._decode(inputs, cache, position, limit, sampler, cancel, started)
        finally:
            stats.seconds = time.perf_counter() - started
            if self.compiled:
                self._lock.release()

    def _decode(self, inputs, cache, position, limit, sampler, cancel, started) -> Iterator[int]:
        import torch

        stats = self._stats
        for step in range(limit):
            if cancel is not None and cancel.is_set():
                stats.stop = "interrupt"
                return
            # Inference mode per step, not around the generator: it is thread-local state that
            # would otherwise stay on in the caller's code between tokens.
            with torch.inference_mode():
                logits, cache = self._forward(inputs, cache, position)
                chosen = sampler(logits)
                token = int(chosen)  # the one host sync per token
            if step == 0:
                stats.first_token_seconds = time.perf_counter() - started
            if token in self.eos_ids:
                stats.stop = "eos"
                return
            stats.completion_tokens += 1
            yield token
            inputs = chosen.view(1, 1)  # already on the device: no copy back
            position = position[-1:] + 1

    def _forward(self, inputs, cache, position):
        if not self.compiled:
            return compat.forward(self.model, inputs, cache, position_ids=position[None])
        call = compat.call_for(self.model)
        kwargs = {call.cache_kw: cache, "use_cache": True, "cache_position": position}
        if call.keep_kw:
            kwargs[call.keep_kw] = 1
        # Only the one-token decode step is compiled: prompts vary in length, and a compiled
        # graph is specialised to its shapes.
        step = self._step if inputs.shape[1] == 1 else self.model
        out = step(input_ids=inputs, **kwargs)
        new_cache = getattr(out, "cache", None) if call.cache_kw == "cache" else out.past_key_values
        return out.logits[:, -1, :], new_cache

    def _step(self, **kwargs):
        return self.model(**kwargs)

    def _new_cache(self, length: int):
        if not self.compiled:
            return None  # the model makes a dynamic cache on the first call
        # One static cache, reused while it is long enough: its shape is part of the compiled
        # graph, so sizes grow in powers of two (each new size compiles once).
        size = min(self.context_window, max(256, 1 << (length - 1).bit_length()))
        if self._static is None or self._static_len < length:
            self._static = compat.static_cache(self.model, size)
            self._static_len = size
        else:
            self._static.reset()
        return self._static

    def _enable_compile(self) -> None:
        """Static KV cache + torch.compile of the forward pass (CUDA graphs on a GPU)."""
        import torch

        mode = "reduce-overhead" if self.model.device.type == "cuda" else "default"
        try:
            compiled = torch.compile(self.model.forward, mode=mode, dynamic=False)
        except Exception as exc:  # no compiler toolchain, unsupported platform
            raise KitError(f"torch.compile is not available here: {exc}",
                           "Run without --compile.") from exc
        self._step = lambda **kw: compiled(**kw)
        self._static, self._static_len = None, 0
        self.compiled = True
