"""Weight-only quantized CPU formats for the native engine, and the CPU facts its defaults follow.

At the 1.8B shape on a CPU, decode reads every weight once per token, so bytes per weight are the
speed: fp32 reads 6.8 GB a token, bf16 3.4 GB, int8 1.8 GB, int4 1.0 GB. The formats, built on
torch's own CPU kernels (no extra dependency):

| format | weights                                   | activations | matmul                              |
| ------ | ----------------------------------------- | ----------- | ----------------------------------- |
| int4   | 4-bit, a scale and offset per 64 inputs   | fp32 (bf16 into the matmul) | `_weight_int4pack_mm_for_cpu` |
| int8   | int8, one scale per output row            | fp32        | fbgemm's dynamic int8 linear        |

int4 is the CPU default: at the 1.8B shape it is the one format that stays within 2.5 GiB (1.7 GB
resident after load), and on an AVX2 CPU without native bf16 its 100-token prompts still ran at
3.6x bf16's speed (one thread, a busy machine). int8 quantizes each matmul's input to 8 bits on the fly (fbgemm), which makes its prompts
the fastest (one 2048x8192 matmul at 100 tokens: 3.5x fp32, 7x bf16) and its quality the closest
to bf16, but fbgemm's packed weights take ~2 bytes per weight in memory (~3.2 GB at 1.8B). The
embedding table is int8 rows (dequantized for the ids looked up) in both; norms stay unquantized.

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

from setup_kit import dtypes

QUANT_FORMATS = ("int8", "int4")
FORMAT_VERSION = 1  # bump when what is stored changes: old caches are then rebuilt
INT4_GROUP = 64
CHUNK_BYTES = 64 << 20  # one safetensors file per ~64 MB: the one being read is mapped whole


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


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """One thread per physical core that is not already busy (the 1-minute load average): on a
    shared 2-core machine at load 7, decode ran 2.8 tokens/s on one thread and 0.3-0.4 on two,
    whose every parallel step waits for both to be scheduled."""
    cores = cores or physical_cores()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(load)))


def set_threads(threads: int | None) -> int:
    """torch's CPU threads: as asked, else `default_threads()` (torch's own default counts every
    core, busy or not). Without torch (a kit-only install that chats with --endpoint, or serve
    in a Python that lacks it, which then says what to install) there is nothing to set."""
    import importlib.util

    chosen = threads or default_threads()
    if importlib.util.find_spec("torch") is None:
        return chosen
    import torch

    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    return chosen


def threads_note() -> str:
    import torch

    threads, cores = torch.get_num_threads(), physical_cores()
    plural = "s" if threads != 1 else ""
    if threads == cores:
        return f"{threads} thread{plural} (= physical cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return f"{threads} thread{plural} ({cores} physical cores, load {load:.1f})"


def int8_kernel_available() -> bool:
    import torch

    return "fbgemm" in torch.backends.quantized.supported_engines


def int4_kernel_available() -> bool:
    """torch's CPU int4 kernels (torch 2.6 and later)."""
    import torch

    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def compute_dtype(fmt: str) -> str:
    """The dtype activations (and unquantized tensors: norms, the residual stream, the KV cache) use
    for a quantized format: fp32 for both. int4's matmul takes its input in bf16 and gives fp32
    back; the rest stays fp32, which is what the speed, memory and quality figures were measured
    on (a bf16 residual stream behind it was never measured, and on transformers 4.38 a bf16 mask
    against fp32 queries failed every chat)."""
    return "fp32"


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
            # Packed in blocks of rows (the same bytes as packing all at once): the packer takes one
            # int32 per weight, 0.76 GB for the 92544-row output layer in one piece.
            blocks = []
            for start in range(0, rows, ROW_BLOCK):
                part = nibbles[start:start + ROW_BLOCK]
                codes = torch.stack([part >> 4, part & 15], dim=-1).reshape(part.shape[0], half * 2)
                blocks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))
            self.packed = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
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


INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants the output rows in multiples of 16
ROW_BLOCK = 4096  # rows quantized at a time: the 92544-row tables never go fp32 whole


def quantize(fmt: str, name: str, tensor) -> dict:
    """The stored tensors for one Llama-named weight in `fmt`."""
    import torch

    if "embed_tokens" in name or (fmt == "int8" and is_linear(name, tensor)):
        parts = [_int8_rows(tensor[i:i + ROW_BLOCK].to(torch.float32, copy=True)) for i in range(0, tensor.shape[0], ROW_BLOCK)]
        return {f"{name}.q8": torch.cat([q for q, _ in parts]), f"{name}.scale": torch.cat([s for _, s in parts])}
    if not is_linear(name, tensor):
        return {name: tensor.float().contiguous()}
    rows, cols = tensor.shape
    if cols % INT4_GROUP or rows % INT4_ROWS:
        # Shapes torch's int4 packer refuses (e.g. a vocabulary that is not a multiple of 16): this
        # one layer stays in the compute dtype rather than the whole load failing.
        return {name: tensor.float().contiguous()}
    parts = [_int4_groups(tensor[i:i + ROW_BLOCK].to(torch.float32, copy=True)) for i in range(0, rows, ROW_BLOCK)]
    # The kernel's layout of scales and zeros: [groups, rows, (scale, zero)].
    return {f"{name}.q4": torch.cat([q for q, _ in parts]),
            f"{name}.sz": torch.cat([sz for _, sz in parts], dim=1).contiguous()}


def _int8_rows(w):
    """(int8 rows, one scale per row): w = q * scale."""
    import torch

    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float()


def _int4_groups(w):
    """(two 4-bit codes per byte, [groups, rows, (scale, zero)] in bf16): w = (code - 8) * scale + zero."""
    import torch

    rows, cols = w.shape
    groups = w.reshape(rows, cols // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    codes = groups.sub_(low).div_(scale).round_().clamp_(0, 15).to(torch.uint8).reshape(rows, cols)
    nibbles = (codes[:, 0::2] << 4) | codes[:, 1::2]
    scales_zeros = torch.cat([scale, low + scale * 8], dim=-1).transpose(0, 1)
    return nibbles.contiguous(), scales_zeros.to(torch.bfloat16)


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


SAFETENSORS_DTYPES = dtypes.SAFETENSORS


def read_tensors(folder: Path) -> Iterator[tuple[str, object]]:
    """(name, tensor) from a folder's weights, one tensor in memory at a time. safetensors files
    are read with plain reads, not mapped: a mapped shard's pages stay resident while it is open
    (2 GB of the 1.8B model's first shard), which is what kept a load over 2.5 GiB."""
    import torch

    from setup_kit.convert import _weight_files, iter_source_tensors
    from setup_kit.errors import ModelFolderError
    from setup_kit.modelfolder import read_safetensors_header

    files = _weight_files(folder)
    if not files:
        raise ModelFolderError(f"{folder} has no weights to quantize.", f"internlm-kit doctor --model {folder}")
    if any(p.suffix != ".safetensors" for p in files):
        yield from iter_source_tensors(folder)  # .bin checkpoints: torch.load, as convert reads them
        return
    for path in files:
        header, _ = read_safetensors_header(path)
        entries = sorted((item for item in header.items() if item[0] != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        with path.open("rb", buffering=0) as handle:
            start = 8 + int.from_bytes(handle.read(8), "little")
            for name, entry in entries:
                begin, end = entry["data_offsets"]
                handle.seek(start + begin)
                data = bytearray(end - begin)
                handle.readinto(data)
                dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
                tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(entry["shape"])


def _return_big_blocks_at_once() -> None:
    """Make glibc map every allocation over 1 MB on its own and unmap it when freed. By default it
    raises that threshold to the size of each big block freed (up to 32 MB), after which the
    quantizer's tensors come from the heap and fragment it: 0.9 GB more at the peak at 1.8B."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand memory freed by quantizing back to the system (glibc keeps it for reuse otherwise,
    and it would count against the loaded model's resident size)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_cache(folder: Path, fmt: str, tensors: Iterator[tuple[str, object]], total: int,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize the streamed (name, tensor) pairs into the cache, chunk by chunk; manifest last."""
    from safetensors.torch import save_file

    _return_big_blocks_at_once()
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
                # Copies, never views of the mapped file: a view would keep the chunk's pages
                # resident beside the packed weights (seen: 2 GB of file pages after loading).
                if kind == "q8":
                    weight, scale = f.get_tensor(key).clone(), f.get_tensor(f"{base}.scale").clone()
                    module = (Int8Embedding(weight, scale, dtype) if "embed_tokens" in base
                              else Int8Linear(weight, scale))
                elif kind == "q4":
                    module = Int4Linear(f.get_tensor(key).clone(), f.get_tensor(f"{base}.sz").clone())
                else:
                    value = f.get_tensor(key).to(dtype).clone()
                    # dtype given: without it accelerate casts to the empty model's own dtype,
                    # whatever compute dtype the format declares (norms and embedding output must
                    # agree: on transformers 4.38 a mask and queries of two dtypes fail SDPA).
                    set_module_tensor_to_device(model, key, "cpu", value=value, dtype=dtype)
                    continue
                _replace(model, base.removesuffix(".weight"), module)


def _replace(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def weight_count(model) -> int:
    """Parameters of a model with quantized modules (their weights are buffers, not parameters)."""
    quantized = [m for m in model.modules() if hasattr(m, "weight_count")]
    return sum(m.weight_count() for m in quantized) + sum(p.numel() for p in model.parameters())
