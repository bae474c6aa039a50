"""`diagnose` (the doctor) and `preflight` (the fast subset chat/serve run before loading a model).

Facts are gathered concurrently (the stdlib probe, the torch probe, nvidia-smi, the remote-code
import check are separate processes), then the checks run on them, then a Report comes back.
"""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setup_kit import dtypes
from setup_kit.checks import Context, all_checks, run_checks, select_checks
from setup_kit.checks.packages import ENGINE_PACKAGES  # noqa: F401  (re-exported for chat/serve)
from setup_kit.report import Report

PREFLIGHT_CHECKS = {
    "native": ("packages.required", "packages.dependencies", "packages.transformers-range", "gpu.memory", "gpu.bf16",
               "model.config", "model.tokenizer", "model.weights"),
    "remote-code": ("packages.required", "packages.dependencies", "known-issues", "gpu.memory", "gpu.bf16",
                    "model.config", "model.tokenizer", "model.weights", "model.remote-code", "model.folder-name"),
    "openai": (),
}


def normalize_dtype(dtype: str | None) -> str:
    return dtypes.torch_name(dtype)


def short_dtype(dtype: str | None) -> str:
    """The engines' and convert's spelling (bf16, fp16, fp32) for any name the doctor accepts, so a
    `--dtype float16` copied from a doctor fix works on every verb. Unknown names pass through."""
    return dtypes.short_name(dtype)


def normalize_device(device: str | None) -> str:
    """auto | cpu | cuda (``cuda:1`` counts as cuda)."""
    device = (device or "auto").lower()
    return "cuda" if device.startswith("cuda") else device


def choose_profile(env, given, has_gpu: bool):
    """(profile, reason, explicit, fix_profile). `given` is a Profile, a name or None. Without one:
    the profile whose transformers and torch pins match what is installed, else none (pins are
    then not checked)."""
    from packaging.version import Version

    from setup_kit.profiles import available_profiles, load_profile

    if given:
        profile = load_profile(given) if isinstance(given, str) else given
        return profile, "--profile", True, profile
    profiles = list(available_profiles().values())
    installed = {n: env.version(n) for n in ("transformers", "torch")}

    def minor(version: str) -> tuple[int, ...]:
        return Version(version).release[:2]

    def matches(profile) -> bool:
        for package, version in installed.items():
            pin = profile.pin(package)
            if version is None or pin is None or minor(pin.version) != minor(version):
                return False
        return True

    chosen = next((p for p in profiles if matches(p)), None)
    if chosen:
        return chosen, f"matches the installed transformers {installed['transformers']} and torch {installed['torch']}", \
            False, chosen
    have = ", ".join(f"{n} {v}" for n, v in installed.items() if v)
    reason = (f"no profile matches {have}" if have else "neither transformers nor torch is installed") + \
        "; pins not checked (pass --profile)"
    from packaging.specifiers import SpecifierSet

    runnable = [p for p in profiles if not p.python or SpecifierSet(p.python).contains(env.python_version)]
    profiles = runnable or profiles
    if installed["transformers"]:
        target = Version(installed["transformers"]).release[:2]
        nearest = min((p for p in profiles if p.pin("transformers")),
                      key=lambda p: abs(minor(p.pin("transformers").version)[1] - target[1]) +
                      100 * abs(minor(p.pin("transformers").version)[0] - target[0]), default=None)
    else:
        by_name = {p.name: p for p in profiles}
        nearest = by_name.get("current" if has_gpu else "cpu")
    return None, reason, False, nearest


def describe_target(ctx: Context, profile_reason: str) -> dict:
    env = ctx.env
    gpus = ctx.gpu.gpus if ctx.gpu else []
    gpu = ", ".join(g.name for g in gpus) if gpus else ("none" if ctx.gpu else "not checked")
    if gpus and ctx.gpu.driver_version:
        gpu += f" (driver {ctx.gpu.driver_version}, CUDA {ctx.gpu.cuda_driver_version or '?'})"
    return {
        "python": ctx.python,
        "python_version": env.python_version if env else "",
        "platform": f"{env.platform['system']} {env.platform['machine']}" if env else platform.platform(),
        "in_virtualenv": env.python.get("in_virtualenv") if env else None,
        "profile": ctx.profile.name if ctx.profile else None,
        "profile_reason": profile_reason,
        "model": str(ctx.model_path) if ctx.model_path else None,
        "engine": ctx.engine or "native",
        "engine_reason": ctx.engine_reason,
        "torch": (ctx.torch.version or ctx.torch.status) if ctx.torch else "not checked",
        "gpu": gpu,
    }


def diagnose(python: str | None = None, model: str | Path | None = None, profile: str | None = None,
             only: list[str] | None = None, dtype: str = "auto", engine: str | None = None,
             device: str = "auto") -> Report:
    """Run the doctor's checks (all, or those named by `only`) against a target interpreter.

    `engine` is whose verdict it is: for "native" (the kit's default) the model's remote code failing
    is a warning, for "remote-code" (trust_remote_code) a problem. None: native where the kit runs,
    remote-code in another interpreter without the kit (what runs there is the user's own code).
    With --model the assumed engine is rehearsed on a miniature twin of the folder."""
    from setup_kit import probe
    from setup_kit.profiles import load_profile

    target = probe.resolve_python(python)
    profile = load_profile(profile) if isinstance(profile, str) else profile  # bad names fail before probing
    started: list = []  # every probe process, so none outlives the doctor (errors, Ctrl-C)
    try:
        # `import torch` is the slowest fact: start it before anything else when every check runs.
        torch_process = probe.start_script(target, "torch_script.py") if not only else None
        started.append(torch_process)
        checks = select_checks(only)
        ctx = gather(target, checks, model, torch_process, started, engine, normalize_dtype(dtype),
                     normalize_device(device))
    finally:
        for process in filter(None, started):
            if process.poll() is None:
                process.kill()
                process.wait()
    ctx.dtype = normalize_dtype(dtype)
    ctx.profile, ctx.profile_reason, ctx.profile_explicit, ctx.fix_profile = choose_profile(
        ctx.env, profile, bool(ctx.gpu and ctx.gpu.gpus))
    return Report(describe_target(ctx, ctx.profile_reason), run_checks(checks, ctx))


def assumed_engine(target: str, env, engine: str | None) -> tuple[str | None, str]:
    """(engine, why): the one given, else native where the kit runs, else remote-code. With env None
    (the environment probe has not answered yet) None where that answer decides."""
    import sys

    if engine:
        return engine, "--engine"
    if Path(target) == Path(sys.executable) or (env is not None and env.has("internlm-kit")):
        return "native", "internlm-kit runs in this interpreter; its chat uses the native engine"
    if env is None:  # not known before the environment probe answers
        return None, ""
    return "remote-code", ("internlm-kit is not installed in this interpreter, so what runs there is the "
                           "model's own code (trust_remote_code, as in the tutorial)")


def rehearsal_timeout() -> float:
    """`INTERNLM_KIT_REHEARSAL_TIMEOUT` seconds (default 180): how long the rehearsal may take."""
    import os

    try:
        return float(os.environ.get("INTERNLM_KIT_REHEARSAL_TIMEOUT", 180))
    except ValueError:
        return 180.0


def gather(target: str, checks, model, torch_process, started: list, engine: str | None = None,
           dtype: str = "auto", device: str = "auto") -> Context:
    """The facts these checks need, from probes running side by side."""
    from setup_kit import probe
    from setup_kit.checks.model import remote_code_imports
    from setup_kit.modelfolder import inspect_model_folder
    from setup_kit.probe import rehearsal

    needs = set().union(*(c.needs for c in checks)) if checks else set()
    env_process = probe.start_script(target, "env_script.py")
    started.append(env_process)
    if torch_process is None and "torch" in needs:
        torch_process = probe.start_script(target, "torch_script.py")
        started.append(torch_process)
    ctx = Context(python=target)
    with ThreadPoolExecutor(max_workers=1) as pool:
        gpu_future = pool.submit(probe.probe_gpu) if needs & {"gpu", "torch"} else None
        if model is not None:
            ctx.model_path = Path(model).expanduser()
            ctx.model = inspect_model_folder(ctx.model_path)
        imports = None
        items = remote_code_imports(ctx.model) if "imports" in needs else []

        def rehearse(chosen: str):
            if "rehearsal" in needs and ctx.model is not None and bool(ctx.model.config) and (
                    chosen == "native" or ctx.model.uses_remote_code):
                # One subprocess: the import check rides along with the rehearsal.
                process = rehearsal.start(target, ctx.model_path, chosen, dtype,
                                          "cpu" if device == "cpu" else "auto", rehearsal_timeout(), items)
                started.append(process[0])
                return process
            return None

        # Start the rehearsal (the slowest probe) as soon as the engine is known: before the environment
        # probe answers, unless that answer decides the engine.
        chosen, ctx.engine_reason = assumed_engine(target, None, engine)
        rehearsing = rehearse(chosen) if chosen else None
        ctx.env = probe.environment_from(env_process, target)  # raises (exit 2) if the target cannot run it
        if chosen is None:
            chosen, ctx.engine_reason = assumed_engine(target, ctx.env, engine)
            rehearsing = rehearse(chosen)
        if chosen == "remote-code":  # native leaves it unset: every package the model may need is still checked
            ctx.engine = chosen
        if rehearsing is None and items:
            imports = probe.start_imports(target, items)
            started.append(imports[0])
        ctx.gpu = gpu_future.result() if gpu_future else None
        ctx.torch = probe.torch_from(torch_process) if torch_process else None
        if rehearsing is not None:
            rehearsed = rehearsal.result(rehearsing)
            ctx.rehearsal = {chosen: rehearsed}
            if items:
                ctx.imports = rehearsed.imports or [dict(i, ok=False, error=f"the rehearsal {rehearsed.stage}: "
                                                     f"{rehearsed.message}") for i in items]
        else:
            ctx.imports = probe.imports_from(imports) if imports else None
    return ctx


def preflight(engine: str, model: str | Path | None, device: str = "auto", dtype: str = "auto") -> Report:
    """The checks that matter before `engine` loads `model` here, from in-process facts only
    (importlib.metadata, nvidia-smi if present; never torch): well under a second."""
    from setup_kit import probe
    from setup_kit.modelfolder import inspect_model_folder
    from setup_kit.probe import gpu as gpu_probe

    device, dtype = normalize_device(device), normalize_dtype(dtype)
    wanted = PREFLIGHT_CHECKS.get(engine, PREFLIGHT_CHECKS["native"])
    checks = [c for c in all_checks() if c.id in wanted]
    ctx = Context(python=probe.resolve_python(None), dtype=dtype, device=device, engine=engine)
    ctx.env = probe.in_process_environment()
    if device == "cpu":
        checks = [c for c in checks if "gpu" not in c.needs]
    elif any("gpu" in c.needs for c in checks):
        ctx.gpu = next((f for f in (gpu_probe.from_nvml(), gpu_probe.from_nvidia_smi())
                        if f is not None and f.source != "none"), gpu_probe.GpuFacts())
    if model is not None:
        ctx.model_path = Path(model).expanduser()
        ctx.model = inspect_model_folder(ctx.model_path)
    else:
        checks = [c for c in checks if "model" not in c.needs]
    ctx.profile, reason, ctx.profile_explicit, ctx.fix_profile = choose_profile(
        ctx.env, None, bool(ctx.gpu and ctx.gpu.gpus))
    return Report(describe_target(ctx, reason), run_checks(checks, ctx))
