"""Weight-only quantized CPU formats for the native engine, and the CPU facts its defaults follow.

At the 1.8B shape on a CPU, decode reads every weight once per token, so bytes per weight are the
speed: fp32 reads 6.8 GB a token, bf16 3.4 GB, int8 1.8 GB. The formats, built on torch's own CPU
kernels (no extra dependency):

| format | weights                                   | activations | matmul                                 |
| ------ | ----------------------------------------- | ----------- | -------------------------------------- |
| int8   | int8, one scale per output row            | fp32        | fbgemm's dynamic int8 linear (AVX2)     |
| int4   | 4-bit, a scale and offset per 64 inputs   | bf16        | `_weight_int4pack_mm_for_cpu`          |

int8 quantizes each matmul's input to 8 bits on the fly (fbgemm's dynamic linear), so prompts run
on integer kernels too: one 2048x8192 matmul at 100 tokens measured 3.5x fp32's speed and 7x bf16's on an AVX2 CPU,
where bf16 has no native instructions. The embedding table is int8 rows (dequantized per token
looked up); norms stay fp32.

Quantized weights are made once per model folder and kept under `state_dir()/quantized/` in the
portable, unpacked form (int8 rows, or two 4-bit values per byte) in chunks of safetensors files,
written while the folder is streamed (no full-precision copy of the model is ever held); a
manifest written last names the source folder's fingerprint and every chunk's size, so a folder
that changed, a chunk that is missing or cut short, or an unreadable header means the cache is
made again. Kernel-specific packing happens at load, tensor by tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

QUANT_FORMATS = ("int8", "int4")
FORMAT_VERSION = 1  # bump when what is stored changes: old caches are then rebuilt
INT4_GROUP = 64
CHUNK_BYTES = 256 << 20  # one safetensors file per ~256 MB of quantized weights


# --- the CPU ---------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> bool:
    """Whether the CPU computes in bf16 itself (AVX512-BF16 or AMX), instead of converting to fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def physical_cores(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in allowed:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", cpu))
            continue
        cores.add((package, core))
    return max(1, len(cores) or (os.cpu_count() or 1))


def set_threads(threads: int | None) -> int:
    """torch's CPU threads: as asked, else one per physical core (torch's own default counts
    hyper-threads, and a busy machine suffers most from threads waiting on each other)."""
    import torch

    chosen = threads or physical_cores()
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    return chosen


def threads_note() -> str:
    import torch

    threads, cores = torch.get_num_threads(), physical_cores()
    same = "= physical cores" if threads == cores else f"of {cores} physical cores"
    return f"{threads} thread{'s' if threads != 1 else ''} ({same})"


def int8_kernel_available() -> bool:
    import torch

    return "fbgemm" in torch.backends.quantized.supported_engines


def compute_dtype(fmt: str) -> str:
    """The dtype activations (and unquantized tensors) use for a quantized format."""
    return "bf16" if fmt == "int4" else "fp32"


# --- the modules ---------------------------------------------------------------------------

def _modules():
    """The nn.Module classes, built on first use (torch is imported lazily)."""
    import torch
    from torch import nn

    class Int8Linear(nn.Module):
        """y = x W^T with W int8 per output row; fbgemm quantizes x per call (dynamic)."""

        def __init__(self, qweight, scale):
            super().__init__()
            torch.backends.quantized.engine = "fbgemm"
            rows = qweight.shape[0]
            with warnings.catch_warnings():
                # torch 2.10+ deprecates quantized tensors (the fbgemm kernels remain; the kit
                # tests this path on every torch it supports, see tests/test_quant.py).
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(qweight, scale.double(),
                                                             torch.zeros(rows, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
            self.in_features, self.out_features = qweight.shape[1], rows

        def forward(self, x):
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(),
                                                   self.packed, True)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

        def weight_count(self) -> int:
            return self.in_features * self.out_features

    class Int4Linear(nn.Module):
        """y = x W^T with W 4-bit in groups of INT4_GROUP inputs (scale and offset per group)."""

        def __init__(self, nibbles, scales_zeros):
            super().__init__()
            rows, half = nibbles.shape
            codes = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(rows, half * 2).to(torch.int32)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16), persistent=False)
            self.in_features, self.out_features = half * 2, rows

        def forward(self, x):
            shape = x.shape
            flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_zeros)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

        def weight_count(self) -> int:
            return self.in_features * self.out_features

    class Int8Embedding(nn.Module):
        """Embedding rows stored int8 with one scale per row, dequantized for the ids looked up."""

        def __init__(self, qweight, scale, dtype):
            super().__init__()
            self.register_buffer("weight", qweight, persistent=False)  # `.weight.shape` as nn.Embedding
            self.register_buffer("scale", scale.float(), persistent=False)
            self.dtype = dtype

        def forward(self, ids):
            return (self.weight[ids].float() * self.scale[ids, None]).to(self.dtype)

        def weight_count(self) -> int:
            return self.weight.numel()

    return Int8Linear, Int4Linear, Int8Embedding


# --- quantizing ------------------------------------------------------------------------------

def is_linear(name: str, tensor) -> bool:
    return tensor.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name


def quantize(fmt: str, name: str, tensor) -> dict:
    """The stored tensors for one Llama-named weight in `fmt`."""
    import torch

    w = tensor.float()
    if "embed_tokens" in name:
        return _int8_rows(name, w)
    if not is_linear(name, tensor):
        return {name: w.contiguous()}
    if fmt == "int8":
        return _int8_rows(name, w)
    rows, cols = w.shape
    if cols % INT4_GROUP:
        raise ValueError(f"{name}: {cols} inputs is not a multiple of the int4 group size {INT4_GROUP}")
    groups = w.reshape(rows, cols // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.uint8).reshape(rows, cols)
    nibbles = (codes[:, 0::2] << 4) | codes[:, 1::2]
    # The kernel's layout: [groups, rows, (scale, zero)], weight = (code - 8) * scale + zero.
    zeros = low + scale * 8
    scales_zeros = torch.cat([scale, zeros], dim=-1).transpose(0, 1).contiguous()
    return {f"{name}.q4": nibbles.contiguous(), f"{name}.sz": scales_zeros.to(torch.bfloat16)}


def _int8_rows(name: str, w) -> dict:
    import torch

    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {f"{name}.q8": q.contiguous(), f"{name}.scale": scale.float()}


# --- the cache -------------------------------------------------------------------------------

def cache_root() -> Path:
    from setup_kit.locations import state_dir

    return state_dir() / "quantized"


def fingerprint(folder: Path) -> dict:
    """What the cache was made from: every weight and config file's name, size and mtime."""
    files = sorted(p for p in folder.iterdir() if p.is_file()
                   and (p.suffix in (".safetensors", ".bin", ".pt") or p.name == "config.json"))
    return {"folder": str(folder.resolve()),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def cache_dir(folder: Path, fmt: str) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_root() / f"{folder.name}-{key}-{fmt}"


def valid_cache(folder: Path, fmt: str) -> Path | None:
    """The cache folder when its manifest matches `folder` as it is now and every chunk is whole."""
    where = cache_dir(folder, fmt)
    try:
        manifest = json.loads((where / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != FORMAT_VERSION or manifest.get("format") != fmt \
            or manifest.get("source") != fingerprint(folder):
        return None
    for name, size in manifest.get("chunks", {}).items():
        chunk = where / name
        if not chunk.is_file() or chunk.stat().st_size != size:
            return None
    return where


def build_cache(folder: Path, fmt: str, tensors: Iterator[tuple[str, object]], total: int,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize the streamed (name, tensor) pairs into the cache, chunk by chunk; manifest last."""
    from safetensors.torch import save_file

    where = cache_dir(folder, fmt)
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    chunks: dict[str, int] = {}
    pending: dict = {}
    pending_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"chunk-{len(chunks):04d}.safetensors"
            save_file(pending, str(where / name))
            chunks[name] = (where / name).stat().st_size
        pending, pending_bytes = {}, 0

    for done, (name, tensor) in enumerate(tensors, 1):
        for key, value in quantize(fmt, name, tensor).items():
            pending[key] = value
            pending_bytes += value.numel() * value.element_size()
        if pending_bytes >= CHUNK_BYTES:
            flush()
        if progress:
            progress(done, total)
    flush()
    manifest = {"version": FORMAT_VERSION, "format": fmt, "source": fingerprint(folder), "chunks": chunks}
    tmp = where / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(where / "manifest.json")
    return where


def install(model, where: Path, fmt: str, dtype) -> None:
    """Fill an empty (meta) Llama model from the cache: quantized modules for every linear layer and
    the embedding, plain tensors for the rest. One chunk is mapped at a time."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    Int8Linear, Int4Linear, Int8Embedding = _modules()
    manifest = json.loads((where / "manifest.json").read_text())
    for chunk in manifest["chunks"]:
        with safe_open(str(where / chunk), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                base, _, kind = key.rpartition(".")
                if kind in ("scale", "sz"):
                    continue
                if kind == "q8":
                    weight, scale = f.get_tensor(key), f.get_tensor(f"{base}.scale")
                    module = (Int8Embedding(weight.clone(), scale, dtype) if "embed_tokens" in base
                              else Int8Linear(weight, scale))
                elif kind == "q4":
                    module = Int4Linear(f.get_tensor(key), f.get_tensor(f"{base}.sz"))
                else:
                    set_module_tensor_to_device(model, key, "cpu", value=f.get_tensor(key).to(dtype))
                    continue
                _replace(model, base.removesuffix(".weight"), module)


def _replace(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def weight_count(model) -> int:
    """Parameters of a model with quantized modules (their weights are buffers, not parameters)."""
    quantized = [m for m in model.modules() if hasattr(m, "weight_count")]
    return sum(m.weight_count() for m in quantized) + sum(p.numel() for p in model.parameters())
