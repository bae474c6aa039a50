"""Which profile to install when none is named: from the machine's GPU and driver facts."""

from __future__ import annotations

from packaging.version import Version

from setup_kit.checks.gpu import loose_version, min_driver
from setup_kit.profiles import Profile


def _torch(profile: Profile) -> Version:
    pin = profile.pin("torch")
    return loose_version(pin.version) if pin else Version("0")


def driver_runs(gpu, cuda: str) -> tuple[bool, str]:
    """(whether the driver runs builds for this CUDA natively, how we know) per envs/cuda.toml."""
    need = min_driver(cuda)
    if gpu.driver_version and need:
        return (loose_version(gpu.driver_version) >= loose_version(need),
                f"driver {gpu.driver_version}, CUDA {cuda} needs >= {need}")
    if gpu.cuda_driver_version:
        return (loose_version(gpu.cuda_driver_version) >= loose_version(cuda),
                f"the driver supports CUDA {gpu.cuda_driver_version}")
    return False, "the driver version is unknown"


def choose_profile(gpu, profiles: dict[str, Profile]) -> tuple[Profile, str]:
    """GPU present: the newest profile (by torch) whose CUDA build the driver runs; else `cpu`."""
    cpu = profiles.get("cpu") or next((p for p in profiles.values() if not p.cuda), None)
    gpus = list(getattr(gpu, "gpus", []) or [])
    if not gpus:
        source = f" ({gpu.error})" if getattr(gpu, "error", "") else ""
        return _need(cpu), f"no NVIDIA GPU found{source}, so the CPU profile"
    names = ", ".join(sorted({g.name for g in gpus}))
    rejected = []
    for profile in sorted((p for p in profiles.values() if p.cuda), key=_torch, reverse=True):
        runs, how = driver_runs(gpu, profile.cuda)
        if runs:
            return profile, (f"{names}: {how}, so {profile.name} (torch {profile.pin('torch').version if profile.pin('torch') else '?'}"
                             f" for CUDA {profile.cuda}) is the newest profile this driver runs")
        rejected.append(f"{profile.name} ({how})")
    return _need(cpu), (f"{names} found, but the driver is too old for every CUDA profile: {'; '.join(rejected)}. "
                        f"Using the CPU profile; update the NVIDIA driver to use the GPU")


def _need(profile: Profile | None) -> Profile:
    from setup_kit.errors import UsageError

    if profile is None:
        raise UsageError("No CPU profile is available to fall back on.", "Pass --profile NAME.")
    return profile
