"""Checks of the machine and the Hugging Face environment: disk, RAM, HF_* and CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from setup_kit.checks.base import Context, Result, check, fail, ok, warn
from setup_kit.checks.gpu import DEFAULT_PARAMETERS, DTYPE_BYTES, QUANT_FORMATS, gib, loose_version, model_bytes

SYSTEM = "System"
HF = "Hugging Face"
MARGIN = 1 << 30
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE = ("1", "true", "yes", "on")


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _hf_cache(env: dict) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or str(Path.home()), ".cache")
    return Path(base) / "huggingface" / "hub"


def _weights_bytes(ctx: Context) -> int:
    return ctx.model.weight_bytes if ctx.model and ctx.model.weight_bytes else DEFAULT_PARAMETERS * 2


@check("system.disk", SYSTEM, "Disk space where the model and the HF cache live", needs=("env",))
def disk(ctx: Context) -> Result:
    from setup_kit.locations import default_model_dir

    complete = ctx.model is not None and ctx.model.ok and ctx.model.weight_bytes > 0
    need = MARGIN if complete else _weights_bytes(ctx) + MARGIN
    places = {"model folder": ctx.model_path or default_model_dir(), "HF cache": _hf_cache(ctx.env.environment)}
    seen, details, short = {}, [], []
    for label, path in places.items():
        existing = _existing(Path(path))
        usage = shutil.disk_usage(existing)
        device = existing.stat().st_dev
        details.append(f"{label} {path}: {gib(usage.free)} free")
        if device in seen:
            continue
        seen[device] = label
        if usage.free < need:
            short.append((label, path, usage.free))
    what = "already downloaded, room to spare" if complete else f"the model needs ~{gib(need)}"
    if not short:
        return ok(f"{gib(min(shutil.disk_usage(_existing(Path(p))).free for p in places.values()))} free; {what}", *details)
    label, path, free = short[0]
    return fail(f"only {gib(free)} free for the {label} ({path}); {what}",
                "Free space there, or download elsewhere: internlm-kit download --local-dir /path/with/space "
                "(and set HF_HOME=/path/with/space/hf for the cache)", *details)


def memory_info() -> tuple[int, int]:
    """(total, available) bytes of RAM."""
    try:
        values = {}
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
        return values["MemTotal"], values.get("MemAvailable", values.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, pages * size


@check("system.ram", SYSTEM, "RAM for loading the model", needs=("env",))
def ram(ctx: Context) -> Result:
    total, available = memory_info()
    on_gpu = (ctx.gpu is not None and bool(ctx.gpu.gpus) and ctx.device != "cpu"
              and ctx.dtype not in QUANT_FORMATS)  # int8/int4 are CPU formats
    if on_gpu:
        need, how = MARGIN * 2, "loading onto the GPU goes through RAM one shard at a time"
    else:
        need, how = model_bytes(ctx, cpu_format(ctx), on_cpu=True)
    where = "to load onto the GPU" if on_gpu else "to run on the CPU"
    summary = f"{gib(available)} available of {gib(total)}; ~{gib(need)} needed {where}"
    if available >= need:
        return ok(summary, how)
    if total >= need:
        return warn(summary, "Close other programs to free memory before loading the model.", how)
    fix = "Use a machine with more RAM, or a GPU: internlm-kit chat --device cuda"
    if not on_gpu and cpu_format(ctx) not in QUANT_FORMATS:
        small, _ = model_bytes(ctx, "int4", on_cpu=True)
        if small <= available:
            fix = (f"Load with int4 weights (~{gib(small)}; top-1 agreement with bf16 ~89%, see the README): "
                   "internlm-kit chat --dtype int4")
    return fail(summary, fix, how)


def cpu_format(ctx: Context) -> str:
    """What the native engine loads on the CPU for the doctor's --dtype: asked for, or its default
    (int4 where the target's torch has the CPU int4 kernels, 2.6 and later; else bf16 on a CPU with
    native bf16, fp32 otherwise)."""
    if ctx.dtype in DTYPE_BYTES or ctx.dtype in QUANT_FORMATS:
        return ctx.dtype
    torch = ctx.env.distributions.get("torch") if ctx.env else None  # installed, not imported: no torch start-up
    if torch is None or loose_version(torch.version) >= loose_version("2.6"):
        return "int4"  # no torch yet: `make setup` installs one that has them
    machine = (ctx.env.platform.get("machine") or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return "int8"  # older torch: fbgemm's int8 kernels, in every x86-64 build
    from setup_kit.engines.quant import native_bf16

    return "bfloat16" if native_bf16() else "float32"


@check("hf.env", HF, "Hugging Face and CUDA environment variables", needs=("env", "gpu"))
def hf_env(ctx: Context) -> Result:
    env = ctx.env.environment
    details = [f"{name}={value}" for name, value in env.items()
               if name.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "CUDA_"))]
    problems: list[tuple[str, str, str]] = []  # (status, summary, fix)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        has_gpu = ctx.gpu is not None and bool(ctx.gpu.gpus)
        problems.append(("fail" if has_gpu else "warn",
                         f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from torch",
                         "unset CUDA_VISIBLE_DEVICES"))
    endpoint = env.get("HF_ENDPOINT")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        problems.append(("fail", f"HF_ENDPOINT={endpoint!r} is not a URL",
                         "export HF_ENDPOINT=https://hf-mirror.com   (a mirror), or: unset HF_ENDPOINT"))
    for name in OFFLINE_VARS:
        if env.get(name, "").lower() in TRUE:
            problems.append(("warn", f"{name}={env[name]}: nothing will be downloaded",
                             f"unset {name}   (before internlm-kit download)"))
    if env.get("TRANSFORMERS_CACHE"):
        problems.append(("warn", "TRANSFORMERS_CACHE is deprecated and ignored by current transformers",
                         f"export HF_HOME={Path(env['TRANSFORMERS_CACHE']).parent} && unset TRANSFORMERS_CACHE"))
    home = env.get("HF_HOME")
    if home and Path(home).exists() and not os.access(home, os.W_OK):
        problems.append(("fail", f"HF_HOME={home} is not writable", "export HF_HOME=~/.cache/huggingface"))
    if not problems:
        shown = f"HF_ENDPOINT={endpoint}" if endpoint else "default hub endpoint"
        return ok(f"{shown}; nothing that blocks downloads or hides the GPU", *details)
    worst = "fail" if any(p[0] == "fail" for p in problems) else "warn"
    first = next(p for p in problems if p[0] == worst)
    fix = "\n".join(dict.fromkeys(p[2] for p in problems))
    details = [f"{p[0]}: {p[1]}" for p in problems] + details
    return (fail if worst == "fail" else warn)(first[1], fix, *details)
