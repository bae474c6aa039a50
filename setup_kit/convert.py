"""InternLM2 checkpoint -> standard Llama layout, streamed tensor by tensor.

The mapping (DESIGN.md): `wqkv` packs, per KV head, its q_per_kv query heads, one key head and one
value head, so viewed as [kv_heads, q_per_kv + 2, head_dim, hidden] it splits into q/k/v_proj with
no permutation (both use rotate-half RoPE); everything else is a rename. The same mapping feeds the
native engine, which loads InternLM2 folders in memory without writing anything.

Output: sharded safetensors + index, a Llama config.json (rope theta and dynamic scaling carried),
generation_config.json, the tokenizer with the chat tokens at their original ids, all written into a
temporary folder beside DST and renamed into place at the end, so DST is never half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from setup_kit import dtypes
from setup_kit.errors import KitError, ModelFolderError, UsageError

DTYPES = dtypes.TORCH_NAMES
DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # like the hub's 2 GB shards
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"model.tok_embeddings.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Buffers some .bin checkpoints carry; recomputed by every implementation.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass
class ConvertResult:
    dst: Path
    tensors: int
    bytes_written: int
    shards: int
    seconds: float
    dtype: str
    weight_seconds: float = 0.0  # the weights alone (reading, splitting, writing): what MB/s is of


# --- what a checkpoint must look like --------------------------------------------------------

def check_internlm2_config(config: dict, where: Path) -> None:
    """Refuse, with the reason, anything the mapping does not cover."""
    fix = f"See what the folder holds: internlm-kit doctor --model {where}"
    model_type = config.get("model_type")
    if model_type != "internlm2":
        raise ModelFolderError(
            f"{where} is not an InternLM2 checkpoint (config.json: model_type={model_type!r}); "
            "convert only understands model_type 'internlm2'.", fix)
    if config.get("bias", False):
        raise ModelFolderError(
            f"{where} has bias=True in config.json: its attention/feed-forward layers carry bias "
            "tensors, which the Llama layout (attention_bias=False) cannot hold.", fix)
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("dynamic", "linear"):
        raise ModelFolderError(f"{where} uses rope_scaling {scaling}, which convert does not map.", fix)
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                           "intermediate_size") if k not in config]
    if missing:
        raise ModelFolderError(f"{where}/config.json lacks {', '.join(missing)}.", fix)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads or config["hidden_size"] % heads:
        raise ModelFolderError(
            f"{where}/config.json: {heads} heads over {kv_heads} KV heads and hidden size "
            f"{config['hidden_size']} do not divide evenly.", fix)


def expected_tensor_names(config: dict) -> set[str]:
    names = set(_TOP)
    for i in range(config["num_hidden_layers"]):
        names.add(f"model.layers.{i}.attention.wqkv.weight")
        names.update(f"model.layers.{i}.{suffix}" for suffix in _RENAMES)
    return names


def llama_config(config: dict, dtype: str) -> dict:
    """The Llama config.json for an InternLM2 config (legacy rope keys, read by every tool)."""
    heads = config["num_attention_heads"]
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config["hidden_size"] // heads,
        "hidden_act": config.get("hidden_act", "silu"),
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": config.get("rope_theta", 10000.0),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": config.get("eos_token_id", 2),
        "pad_token_id": config.get("pad_token_id", 2),
        "initializer_range": config.get("initializer_range", 0.02),
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if scaling := config.get("rope_scaling"):
        kind = scaling.get("type", scaling.get("rope_type"))
        # The legacy two-field spelling: transformers < 4.43 rejects any other key (the tutorial's
        # 4.38 included), and newer releases, vLLM and llama.cpp's converter all read "type".
        out["rope_scaling"] = {"type": kind, "factor": float(scaling["factor"])}
    return out


def generation_config(src: Path, config: dict, vocab_size: int, chat_end_id: int | None) -> dict:
    """generation_config.json: the source's, or eos [</s>, <|im_end|>] when it has none."""
    path = src / "generation_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        eos = [config.get("eos_token_id", 2)] + ([chat_end_id] if chat_end_id is not None else [])
        data = {"bos_token_id": config.get("bos_token_id", 1), "eos_token_id": eos,
                "pad_token_id": config.get("pad_token_id", 2)}
    data.pop("transformers_version", None)
    return data


# --- reading the source, tensor by tensor ----------------------------------------------------

@dataclass
class SourceTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"


_ST_DTYPES = dtypes.SAFETENSORS


def _weight_files(folder: Path) -> list[Path]:
    """The shards an index names (stray files beside them are not the model), else the files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as exc:
                raise ModelFolderError(f"{index} cannot be read: {exc}.",
                                       f"Download it again; internlm-kit doctor --model {folder}") from exc
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ModelFolderError(f"{index_name} names {', '.join(missing)}, which is missing.",
                                       f"Download it again; internlm-kit doctor --model {folder}")
            return [folder / n for n in names]
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("pytorch_model*.bin"))


def list_source_tensors(folder: Path) -> list[SourceTensor]:
    """Every tensor's name, file, shape and dtype, in storage order, without reading the data."""
    import torch

    from setup_kit.modelfolder import read_safetensors_header

    found = []
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            header, _ = read_safetensors_header(path)
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0])
            found += [SourceTensor(k, path, tuple(v["shape"]), _ST_DTYPES.get(v["dtype"], v["dtype"]))
                      for k, v in entries]
        else:
            state = _load_bin(path)
            found += [SourceTensor(k, path, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                      for k, t in state.items() if isinstance(t, torch.Tensor)]
    return found


def _load_bin(path: Path) -> dict:
    import torch

    try:
        try:
            # mmap: tensors stay on disk until touched, so one .bin costs little memory to list.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # The pre-1.6 (non-zip) format cannot be mapped: read it whole (one shard's memory).
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip files
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFolderError(f"{path} cannot be read as a PyTorch checkpoint: {first_line}",
                               f"Download it again; internlm-kit doctor --model {path.parent}") from exc


def iter_source_tensors(folder: Path) -> Iterator[tuple[str, object]]:
    """(name, tensor) for every tensor, one file open at a time, one tensor in memory at a time."""
    from safetensors import safe_open

    from setup_kit.modelfolder import read_safetensors_header

    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            header, _ = read_safetensors_header(path)
            # Storage order: reads go forward through the file, and match the shard plan's order.
            order = sorted((k for k in header if k != "__metadata__"),
                           key=lambda k: header[k]["data_offsets"][0])
            with safe_open(str(path), framework="pt") as handle:
                for name in order:
                    yield name, handle.get_tensor(name)
        else:
            state = _load_bin(path)
            for name in list(state):
                yield name, state.pop(name)
            del state


def map_tensor(name: str, tensor, config: dict) -> list[tuple[str, object]]:
    """One InternLM2 tensor -> its Llama tensor(s). Unknown names raise KitError."""
    if name in _TOP:
        return [(_TOP[name], tensor)]
    match = _LAYER.match(name)
    if match:
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _RENAMES:
            return [(prefix + _RENAMES[rest], tensor)]
        if rest == "attention.wqkv.weight":
            return [(prefix + f"self_attn.{p}_proj.weight", t)
                    for p, t in zip("qkv", split_wqkv(tensor, config))]
    raise ModelFolderError(
        f"the checkpoint has a tensor convert does not know: {name}.",
        "Only InternLM2 checkpoints in the hub's layout are supported; "
        "internlm-kit doctor --model SRC shows what the folder holds.")


def split_wqkv(wqkv, config: dict):
    """[kv_heads * (q_per_kv + 2) * head_dim, hidden] -> q, k, v projection weights."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim, q_per_kv = hidden // heads, heads // kv_heads
    grouped = wqkv.view(kv_heads, q_per_kv + 2, head_dim, hidden)
    q = grouped[:, :q_per_kv].reshape(heads * head_dim, hidden)
    k = grouped[:, q_per_kv].reshape(kv_heads * head_dim, hidden)
    v = grouped[:, q_per_kv + 1].reshape(kv_heads * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
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
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def check_tensors(folder: Path, config: dict, tensors: list[SourceTensor]) -> None:
    names = {t.name for t in tensors if not _IGNORED.search(t.name)}
    expected = expected_tensor_names(config)
    fix = f"Download the checkpoint again, or see internlm-kit doctor --model {folder}"
    if missing := sorted(expected - names):
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFolderError(
            f"{folder} is missing {len(missing)} tensor(s) an InternLM2 model with "
            f"{config['num_hidden_layers']} layers needs: {', '.join(missing[:3])}{more}.", fix)
    if extra := sorted(names - expected):
        kind = "bias tensors" if any(n.endswith(".bias") for n in extra) else "tensors"
        raise ModelFolderError(
            f"{folder} holds {kind} the Llama layout has no place for: {', '.join(extra[:3])}.", fix)
    shapes = expected_shapes(config)
    for t in tensors:
        if t.name in shapes and t.shape != shapes[t.name]:
            raise ModelFolderError(
                f"{folder}: tensor {t.name} has shape {list(t.shape)}, but config.json implies "
                f"{list(shapes[t.name])}; the weights and config.json do not belong together.", fix)


def iter_llama_tensors(folder: Path, config: dict, dtype=None) -> Iterator[tuple[str, object]]:
    """The Llama state dict, streamed: each source tensor is mapped (and cast) as it is read."""
    for name, tensor in iter_source_tensors(folder):
        if _IGNORED.search(name):
            continue
        for new_name, new in map_tensor(name, tensor, config):
            yield new_name, (new.to(dtype) if dtype is not None and new.dtype != dtype else new)


# --- writing ---------------------------------------------------------------------------------

def _resolve_dtype(choice: str, tensors: list[SourceTensor], config: dict) -> str:
    if choice in ("auto", None):
        stored = {t.dtype for t in tensors if t.dtype in DTYPES.values()}
        if len(stored) == 1:
            return stored.pop()
        return str(config.get("torch_dtype") or "float32")
    return DTYPES[choice]


def _prepare_destination(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UsageError(f"DST {dst} must be a new folder outside SRC {src}.",
                         "Choose another destination, e.g. SRC-llama next to it.")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"DST {dst} exists and is not a folder.", "Choose another destination.")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise UsageError(f"DST {dst} already exists and is not empty; convert will not overwrite it.",
                         "Choose an empty or new folder, or pass --force to replace it.")


def _plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _output_sizes(tensors: list[SourceTensor], config: dict, dtype: str) -> list[tuple[str, int]]:
    """(llama name, bytes) in the order the stream will produce them."""
    import torch

    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    out = []
    for t in tensors:
        if _IGNORED.search(t.name):
            continue
        numel = _numel(t.shape)
        if t.name.endswith("attention.wqkv.weight"):
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            kv = config.get("num_key_value_heads") or heads
            layer = _LAYER.match(t.name).group(1)
            head_dim = hidden // heads
            for proj, rows in (("q", heads), ("k", kv), ("v", kv)):
                out.append((f"model.layers.{layer}.self_attn.{proj}_proj.weight",
                            rows * head_dim * hidden * item))
        else:
            out.append((map_tensor(t.name, None, config)[0][0], numel * item))
    return out


def _write_weights(src: Path, tmp: Path, config: dict, dtype: str, max_shard_bytes: int,
                   tensors: list[SourceTensor], progress: Callable[[int, int], None] | None) -> tuple[int, int, int]:
    import torch
    from safetensors.torch import save_file

    sizes = _output_sizes(tensors, config, dtype)
    total = sum(s for _, s in sizes)
    plan = _plan_shards(sizes, max_shard_bytes)
    names = [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    if len(plan) == 1:
        names = ["model.safetensors"]
    shard_of = {n: i for i, group in enumerate(plan) for n in group}
    pending: list[dict] = [{} for _ in plan]
    weight_map, written, count = {}, 0, 0
    for name, tensor in iter_llama_tensors(src, config, getattr(torch, dtype)):
        i = shard_of[name]
        pending[i][name] = tensor
        if len(pending[i]) == len(plan[i]):
            # The shard is complete: write it and let its tensors go.
            save_file(pending[i], str(tmp / names[i]), metadata={"format": "pt"})
            for n, t in pending[i].items():
                weight_map[n] = names[i]
                written += t.numel() * t.element_size()
                count += 1
            pending[i] = {}
            if progress:
                progress(written, total)
    if len(plan) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return count, written, len(plan)


def convert_checkpoint(src, dst, *, dtype: str = "auto", force: bool = False,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert the InternLM2 folder `src` into a Llama-layout folder `dst`."""
    from setup_kit.modelfolder import open_model_folder
    from setup_kit.tokenizer_files import read_tokenizer_config, renamed_pieces, write_tokenizer

    started = time.perf_counter()
    if dtype not in ("auto", None, *DTYPES):
        raise UsageError(f"--dtype {dtype!r} is not one of auto, bf16, fp16, fp32.",
                         "Pick one, e.g. --dtype bf16.")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    folder = open_model_folder(src)
    config = folder.config
    check_internlm2_config(config, src)
    _prepare_destination(src, dst, force)
    tensors = list_source_tensors(src)
    check_tensors(src, config, tensors)
    out_dtype = _resolve_dtype(dtype, tensors, config)
    _check_disk_space(dst, tensors, out_dtype)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_tokenizer(src, tmp)
        renames = renamed_pieces(read_tokenizer_config(src), config["vocab_size"])
        chat_end = next((i for i, n in renames.items() if n == "<|im_end|>"), None)
        (tmp / "config.json").write_text(json.dumps(llama_config(config, out_dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            generation_config(src, config, config["vocab_size"], chat_end), indent=2))
        weights_started = time.perf_counter()
        count, written, shards = _write_weights(src, tmp, config, out_dtype, max_shard_bytes,
                                                tensors, progress)
        weight_seconds = time.perf_counter() - weights_started
        _readable_like_the_rest(tmp)
        _swap_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(dst, count, written, shards, time.perf_counter() - started, out_dtype, weight_seconds)


def _readable_like_the_rest(folder: Path) -> None:
    """safetensors writes its files 0600; every file of the output gets the mode the umask gives
    new files (0644 usually), as config.json does, so whoever may read the folder reads all of it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _check_disk_space(dst: Path, tensors: list[SourceTensor], dtype: str) -> None:
    import torch

    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    need = sum(_numel(t.shape) for t in tensors) * item
    parent = next(p for p in [dst, *dst.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < need * 1.05 + 50 * 1024**2:
        raise KitError(f"Not enough disk space at {parent}: the converted weights need about "
                       f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free.",
                       "Free some space or choose a destination on another disk.")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder to DST; an old DST (--force) is removed only after that."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        if old is not None and not dst.exists():
            old.rename(dst)  # put back what the user had
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
