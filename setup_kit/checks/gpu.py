"""Checks of torch and the GPU stack: the torch import, its CUDA build vs the GPU and the driver,
GPU memory for the model in its dtype, and bf16 by compute capability."""

from __future__ import annotations

import sys
from functools import lru_cache

from packaging.version import InvalidVersion, Version

from setup_kit.checks.base import Context, Result, check, fail, ok, parameters, skip, warn
from setup_kit.checks.fixes import pip_install

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

GPU = "PyTorch and GPU"
TORCH_INDEX = "https://download.pytorch.org/whl/cu{}"
DEFAULT_PARAMETERS = 1_889_110_016  # internlm2-chat-1_8b
# internlm2-chat-1_8b's shape, for the estimate when no folder is given
DEFAULT_CONFIG = {"num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
                  "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 32768}
CONTEXT_TOKENS = 4096  # the KV cache the memory estimate leaves room for
OVERHEAD_BYTES = 1 << 30  # on a GPU: the CUDA context and the allocator's slack
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# The native engine's quantized CPU formats (setup_kit/engines/quant.py): bytes held per weight of a
# linear layer and of the embedding table (the compute dtype is quant.compute_dtype's).
QUANT_FORMATS = {
    "int4": (0.5 + 4 / 64, 1),  # two values a byte + a bf16 scale and offset per 64; int8 embedding rows
    "int8": (2, 1),  # fbgemm's packed weights hold ~2 bytes a weight (3.2 GB at 1.8B); int8 embedding rows
}
# A quantized format's KV cache and activations are in its compute dtype (fp32), and the cache chunk
# being read (up to 64 MB, mapped) counts on top. Measured at the benchmark shape (chat --prompt,
# 4096-token context), int4 peaked anywhere from 0.62 to 0.89 GiB between runs, venvs and machine
# load; fp32 at 0.83-0.89.
QUANT_CHUNK_BYTES = 64 << 20


@lru_cache(maxsize=1)
def cuda_tables() -> dict:
    from setup_kit.locations import envs_dir

    with open(envs_dir() / "cuda.toml", "rb") as handle:
        return tomllib.load(handle)


def loose_version(text: str) -> Version:
    """A version to compare; an unparsable one sorts first."""
    try:
        return Version(text)
    except InvalidVersion:
        return Version("0")


def min_driver(cuda: str) -> str | None:
    """The minimum driver for a CUDA toolkit version (the nearest listed one at or below it)."""
    table = cuda_tables()["min_driver"]
    listed = sorted((k for k in table if loose_version(k) <= loose_version(cuda)), key=loose_version)
    same_major = [k for k in listed if k.split(".")[0] == cuda.split(".")[0]]
    return table[same_major[-1]] if same_major else None


def _builds(torch_version: str) -> list[str]:
    """CUDA variants of this torch release; a release newer than the table is assumed to keep
    the newest listed release's variants."""
    table = cuda_tables()["torch_builds"]
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    if minor in table:
        return table[minor]
    newest = max(table, key=loose_version)
    return table[newest] if loose_version(minor) > loose_version(newest) else []


def torch_variant_for_driver(torch_version: str, driver: str) -> tuple[str, bool] | None:
    """(CUDA variant, runs natively) of this torch release for the driver: the newest variant the
    driver runs natively, else the newest it runs under minor-version compatibility, else None."""
    builds = sorted(_builds(torch_version), key=loose_version, reverse=True)
    native = [c for c in builds if (need := min_driver(c)) and loose_version(driver) >= loose_version(need)]
    if native:
        return native[0], True
    floors = cuda_tables()["minor_compat_floor"]
    compat = [c for c in builds if (floor := floors.get(c.split(".")[0])) and loose_version(driver) >= loose_version(floor)]
    return (compat[0], False) if compat else None


def torch_fix_for_driver(ctx: Context, driver: str) -> str:
    """The command that gives this machine a torch whose CUDA its driver runs."""
    found = torch_variant_for_driver(ctx.torch.version, driver) if driver else None
    if found and found[1]:
        return torch_reinstall(ctx, found[0])
    from setup_kit.profiles import available_profiles

    for profile in available_profiles().values():
        need = min_driver(profile.cuda) if profile.cuda else None
        if need and driver and loose_version(driver) >= loose_version(need):
            command = f"internlm-kit install --profile {profile.name} --python {ctx.python}"
            if found:
                command = f"{torch_reinstall(ctx, found[0])}   (runs under CUDA minor-version compatibility), or: {command}"
            return command + f"   (torch {profile.pin('torch').version} for CUDA {profile.cuda}, needs driver >= {need})"
    if found:
        return f"{torch_reinstall(ctx, found[0])}   (runs under CUDA minor-version compatibility)"
    update = "Update the NVIDIA driver (e.g. sudo apt install nvidia-driver-550)"
    for minor in sorted(cuda_tables()["torch_builds"], key=loose_version, reverse=True):  # an older torch this driver runs
        older = torch_variant_for_driver(f"{minor}.0", driver) if driver else None
        if older:
            how = "" if older[1] else " under CUDA minor-version compatibility"
            return (f"{update}, or install torch {minor}, whose CUDA {older[0]} build this driver runs{how}: "
                    + pip_install(ctx.python, [f"torch=={minor}.*"], "--index-url",
                                  TORCH_INDEX.format(older[0].replace(".", ""))))
    return f"{update}, then install a CUDA build of torch"


def torch_reinstall(ctx: Context, cuda: str) -> str:
    version = ctx.torch.version.split("+")[0]
    return pip_install(ctx.python, [f"torch=={version}"], "--force-reinstall", "--index-url",
                       TORCH_INDEX.format(cuda.replace(".", "")))


def capability(gpu) -> str:
    if gpu.capability:
        return gpu.capability
    for name, value in sorted(cuda_tables()["capability_by_name"].items(), key=lambda kv: -len(kv[0])):
        if name in gpu.name:
            return value
    return ""


@check("torch.import", GPU, "torch imports (in its own process)", needs=("torch",))
def torch_import(ctx: Context) -> Result:
    facts = ctx.torch
    installed = ctx.env.version("torch") if ctx.env else None
    if facts.status == "missing" and installed is None:
        return skip("torch is not installed (see packages.required)")
    if facts.status == "ok":
        build = f"CUDA {facts.cuda}" if facts.cuda else "CPU build"
        return ok(f"torch {facts.version} ({build}) imports in {facts.seconds:.1f}s", *facts.warnings)
    pin = f"torch=={installed.split('+')[0]}" if installed else "torch"
    variant = installed.partition("+")[2] if installed else ""  # cu121, cpu: keep the same build
    source = ("--index-url", f"https://download.pytorch.org/whl/{variant}") if variant else ()
    fix = pip_install(ctx.python, [pin], "--force-reinstall", "--no-deps", *source) + \
        "   (if it still fails: check LD_LIBRARY_PATH and PYTHONPATH for a second torch or CUDA library)"
    what = {"timeout": "`import torch` hangs", "crashed": "`import torch` crashes",
            "error": "the torch probe failed",
            "missing": f"torch {installed} is installed (its metadata is there) but `import torch` finds no module"
            }[facts.status]
    return fail(what, fix, *facts.detail.splitlines())


@check("torch.cuda-vs-gpu", GPU, "torch's CUDA build vs the GPUs present", needs=("torch", "gpu"))
def torch_vs_gpu(ctx: Context) -> Result:
    facts, gpus = ctx.torch, ctx.gpu.gpus
    if facts.status != "ok":
        return skip("torch did not import (see torch.import)")
    names = ", ".join(g.name for g in gpus)
    if not gpus:
        why = ctx.gpu.error or "no NVIDIA GPU found (no NVML, nvidia-smi or libcuda)"
        build = f"a CUDA {facts.cuda} build" if facts.cuda else "the CPU build"
        return ok(f"no GPU: torch {facts.version} ({build}) runs on the CPU", why)
    if not facts.cuda:
        return fail(f"torch {facts.version} is a CPU build, but this machine has {names}",
                    torch_fix_for_driver(ctx, ctx.gpu.driver_version))
    if facts.cuda_available:
        return ok(f"torch {facts.version} (CUDA {facts.cuda}) sees {len(facts.devices)} GPU(s): {names}")
    details = list(facts.warnings)
    visible = ctx.env.environment.get("CUDA_VISIBLE_DEVICES") if ctx.env else None
    if visible is not None and visible.strip() in ("", "-1"):
        return fail(f"torch sees no GPU because CUDA_VISIBLE_DEVICES={visible!r} hides {names}",
                    "unset CUDA_VISIBLE_DEVICES", *details)
    if any("too old" in w for w in facts.warnings):
        return fail(f"torch (CUDA {facts.cuda}) says the driver {ctx.gpu.driver_version} is too old for it",
                    torch_fix_for_driver(ctx, ctx.gpu.driver_version), *details)
    return fail(f"torch {facts.version} (CUDA {facts.cuda}) cannot use {names}: torch.cuda.is_available() is False",
                "Run `nvidia-smi`; if it works, reinstall torch for your driver: "
                + torch_fix_for_driver(ctx, ctx.gpu.driver_version), *details)


@check("torch.cuda-vs-driver", GPU, "torch's CUDA version vs the driver", needs=("torch", "gpu"))
def torch_vs_driver(ctx: Context) -> Result:
    facts, gpu = ctx.torch, ctx.gpu
    if facts.status != "ok" or not facts.cuda:
        return skip("no CUDA build of torch to compare (see torch.import)")
    if not gpu.gpus or not (gpu.driver_version or gpu.cuda_driver_version):
        return skip("no NVIDIA driver found")
    if not gpu.driver_version:  # libcuda tells the CUDA version the driver supports, not the driver's
        return _cuda_vs_driver_cuda(ctx)
    needed = min_driver(facts.cuda)
    if needed is None:
        return skip(f"no driver table entry for CUDA {facts.cuda}")
    detail = f"driver {gpu.driver_version} supports CUDA up to {gpu.cuda_driver_version or '?'}; " \
             f"CUDA {facts.cuda} needs >= {needed}"
    if loose_version(gpu.driver_version) >= loose_version(needed):
        return ok(f"driver {gpu.driver_version} runs torch's CUDA {facts.cuda} (needs >= {needed})", detail)
    fix = torch_fix_for_driver(ctx, gpu.driver_version) + f"\nor update the NVIDIA driver to >= {needed}"
    floor = cuda_tables()["minor_compat_floor"].get(facts.cuda.split(".")[0])
    if floor and loose_version(gpu.driver_version) >= loose_version(floor):
        return warn(f"driver {gpu.driver_version} is older than CUDA {facts.cuda} wants ({needed}); "
                    "it runs under CUDA minor-version compatibility (no PTX JIT of newer kernels)", fix, detail)
    return fail(f"driver {gpu.driver_version} is too old for torch's CUDA {facts.cuda} (needs >= {needed})",
                fix, detail)


def _cuda_vs_driver_cuda(ctx: Context) -> Result:
    built, supported = ctx.torch.cuda, ctx.gpu.cuda_driver_version
    detail = f"the driver supports CUDA up to {supported} (from {ctx.gpu.source}); torch was built for CUDA {built}"
    if loose_version(built) <= loose_version(supported):
        return ok(f"the driver supports CUDA {supported}, torch needs {built}", detail)
    fix = f"Update the NVIDIA driver to >= {min_driver(built) or 'one for CUDA ' + built}, or: " + \
        torch_fix_for_driver(ctx, "")
    if built.split(".")[0] == supported.split(".")[0]:
        return warn(f"torch's CUDA {built} is newer than the driver's {supported}: only CUDA minor-version "
                    "compatibility makes it run", fix, detail)
    return fail(f"torch's CUDA {built} is newer than the driver supports ({supported})", fix, detail)


def resolved_dtype(ctx: Context, gpus) -> str:
    if ctx.dtype != "auto":
        return ctx.dtype
    caps = [capability(g) for g in gpus]
    if caps and all(c and loose_version(c) >= loose_version("8.0") for c in caps):
        return (ctx.model.torch_dtype if ctx.model and ctx.model.torch_dtype in DTYPE_BYTES else "bfloat16")
    return "float16"


# What the native engine holds besides weights and KV cache, measured with `chat --prompt` on a
# 32768-token config (tests/test_memory_estimate.py and benchmarks/stack_speed.py hold the estimate
# against a measured peak on transformers 4.38.2, 4.46.3 and 5.x):
RUNTIME_BYTES = 512 << 20  # CPU: Python, torch, transformers and the kit (370-450 MiB with a 0.3M-parameter model)
ACTIVATION_FACTOR = 10  # a prompt's forward peaks at about 8.6 x tokens x (hidden + intermediate) values (4.46.3)


def memory_estimate(config: dict, params: int, dtype_bytes: int, tokens: int, *, on_cpu: bool,
                    largest_shard: int = 0, weight_bytes: int | None = None) -> dict[str, int]:
    """Bytes the native engine holds at its peak with a context of `tokens` tokens, by part; the
    peak is their sum.

    weights: params x dtype; kv: the KV cache of `tokens` (layers x 2 x KV heads x head dim);
    activations: one forward over a prompt of `tokens` at once (linear in tokens on every
    supported release: the engine builds masks for the tokens at hand, and prefills in 512-token
    chunks on 4.38/4.39, whose attention takes a float mask); loading: a shard's pages, mapped
    while its tensors are copied (only where that is more than kv + activations, which come
    later); runtime: the CPU process without a model, or on a GPU the CUDA context.
    """
    config = config if config.get("hidden_size") else DEFAULT_CONFIG
    heads = config.get("num_attention_heads") or DEFAULT_CONFIG["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    layers = config.get("num_hidden_layers") or DEFAULT_CONFIG["num_hidden_layers"]
    intermediate = config.get("intermediate_size") or 4 * hidden
    kv = layers * 2 * kv_heads * head_dim * dtype_bytes * tokens
    activations = ACTIVATION_FACTOR * tokens * (hidden + intermediate) * dtype_bytes
    return {
        "weights": params * dtype_bytes if weight_bytes is None else weight_bytes,
        "kv": kv,
        "activations": activations,
        "loading": max(0, largest_shard - kv - activations) if on_cpu else 0,
        "runtime": RUNTIME_BYTES if on_cpu else OVERHEAD_BYTES,
    }


def model_bytes(ctx: Context, dtype: str, *, on_cpu: bool = False) -> tuple[int, str]:
    """What the native engine needs for the folder (or internlm2-chat-1_8b) in `dtype` with a
    context of CONTEXT_TOKENS; and how it was estimated."""
    model = ctx.model
    params = model.parameters if model and model.parameters else DEFAULT_PARAMETERS
    config = model.config if model and model.config else {}
    tokens = min(CONTEXT_TOKENS, int(config.get("max_position_embeddings") or CONTEXT_TOKENS))
    shard = max((w.size for w in model.weight_files), default=0) if model else 2 * 2**30
    source = "the model folder's shards" if model and model.parameters else "internlm2-chat-1_8b"
    if dtype in QUANT_FORMATS:
        from setup_kit import dtypes
        from setup_kit.engines.quant import compute_dtype

        linear, embedding = QUANT_FORMATS[dtype]
        compute = dtypes.torch_name(compute_dtype(dtype))
        hidden = config.get("hidden_size") or DEFAULT_CONFIG["hidden_size"]
        embedded = min(params, int(config.get("vocab_size") or 92544) * hidden)
        weights = int((params - embedded) * linear + embedded * embedding)
        size = DTYPE_BYTES[compute]
        # The quantized cache is read one chunk at a time (its first build streams the folder tensor
        # by tensor), so no shard is ever mapped whole.
        parts = memory_estimate(config, params, size, tokens, on_cpu=on_cpu, weight_bytes=weights)
        parts["loading"] = QUANT_CHUNK_BYTES
        what = (f"{parameters(params)} ({source}) as {dtype} weights ({linear:.2f} bytes each, the embedding "
                f"{embedding}) = {gib(parts['weights'])}, {compute} compute")
    else:
        size = DTYPE_BYTES.get(dtype, 2)
        parts = memory_estimate(config, params, size, tokens, on_cpu=on_cpu, largest_shard=shard)
        what = f"{parameters(params)} ({source}) x {size} bytes ({dtype}) = {gib(parts['weights'])}"
    how = (what +
           f" + KV cache for {tokens} tokens {gib(parts['kv'])} + a {tokens}-token prompt's forward "
           f"{gib(parts['activations'])}"
           + (f" + {'a cache chunk' if dtype in QUANT_FORMATS else 'a shard'} being loaded {gib(parts['loading'])}"
              if parts["loading"] else "")
           + (f" + Python, torch and transformers {gib(parts['runtime'])}" if on_cpu
              else f" + CUDA context {gib(parts['runtime'])}"))
    return sum(parts.values()), how


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


@check("gpu.memory", GPU, "GPU memory for the model in its dtype", needs=("gpu",))
def gpu_memory(ctx: Context) -> Result:
    gpus = ctx.gpu.gpus
    if not gpus and ctx.device == "cuda":
        return fail("--device cuda, but no NVIDIA GPU was found" + (f" ({ctx.gpu.error})" if ctx.gpu.error else ""),
                    "run on the CPU: --device cpu (or check the driver with `nvidia-smi`)")
    if not gpus or ctx.device == "cpu":
        return skip("no GPU in use")
    dtype = resolved_dtype(ctx, gpus)
    need, how = model_bytes(ctx, dtype)
    best = max(gpus, key=lambda g: g.memory_free_mib if g.memory_free_mib is not None else (g.memory_total_mib or 0))
    free = (best.memory_free_mib if best.memory_free_mib is not None else best.memory_total_mib or 0) * 2**20
    total = (best.memory_total_mib or 0) * 2**20
    details = [how] + [f"GPU {g.index} {g.name}: {g.memory_free_mib} MiB free of {g.memory_total_mib} MiB" for g in gpus]
    if free >= need:
        return ok(f"GPU {best.index} ({best.name}) has {gib(free)} free; the model needs ~{gib(need)} in {dtype}", *details)
    if dtype == "float32":
        return fail(f"~{gib(need)} needed in float32, {gib(free)} free: load in half precision",
                    "pass --dtype float16 (or bfloat16 on compute capability >= 8.0); float32 doubles the memory",
                    *details)
    if total >= need:
        pick = f"CUDA_VISIBLE_DEVICES={best.index} " if len(gpus) > 1 else ""
        return fail(f"only {gib(free)} free on GPU {best.index} ({best.name}); the model needs ~{gib(need)} in {dtype}",
                    f"Free GPU memory (see the processes in `nvidia-smi`), then run {pick}internlm-kit chat; "
                    "or run on the CPU: internlm-kit chat --device cpu", *details)
    return fail(f"{best.name} has {gib(total)} in all; the model needs ~{gib(need)} in {dtype}",
                "Run on the CPU: internlm-kit chat --device cpu (or use a GPU with more memory)", *details)


@check("gpu.bf16", GPU, "bfloat16 by compute capability", needs=("gpu",))
def bf16(ctx: Context) -> Result:
    gpus = ctx.gpu.gpus
    if not gpus or ctx.device == "cpu":
        return skip("no GPU in use")
    caps = {g.index: capability(g) for g in gpus}
    if not all(caps.values()):
        return skip("compute capability unknown for " + ", ".join(g.name for g in gpus if not caps[g.index]))
    old = [g for g in gpus if loose_version(caps[g.index]) < loose_version("8.0")]
    listing = ", ".join(f"{g.name} ({caps[g.index]})" for g in gpus)
    if not old:
        return ok(f"bfloat16 is native on {listing}")
    summary = (f"{', '.join(g.name for g in old)} (compute capability {caps[old[0].index]}) has no native bfloat16 "
               "(needs >= 8.0)")
    note = ("torch.cuda.is_bf16_supported() still says True there on torch >= 2.3 (emulation), "
            "so the kit checks the capability itself.")
    fix = "use float16: internlm-kit chat --dtype fp16 (in your own code: torch_dtype=torch.float16)"
    if ctx.dtype == "bfloat16":
        return fail(summary + ", but bfloat16 was asked for", fix, note)
    return warn(summary + "; the kit's --dtype auto uses float16 there", fix, note)
