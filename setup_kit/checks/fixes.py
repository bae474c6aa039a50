"""Fix commands: copy-pasteable, pinned, for the target interpreter."""

from __future__ import annotations

import shlex

from setup_kit.profiles import Pin, Profile


def pip_install(python: str, requirements: list[str], *extra: str) -> str:
    quoted = " ".join(f'"{r}"' for r in requirements)
    tail = " ".join(extra)
    return f"{shlex.quote(python)} -m pip install {quoted}{' ' + tail if tail else ''}"


def install_pins(python: str, profile: Profile, pins: list[Pin]) -> str:
    """pip command(s) for these pins; torch-group pins come from the profile's torch index."""
    torch_pins = [p.requirement for p in pins if p.group == "torch"]
    other_pins = [p.requirement for p in pins if p.group != "torch"]
    commands = []
    if torch_pins:
        source = ("--index-url", profile.torch_index_url) if profile.torch_index_url else ()
        commands.append(pip_install(python, torch_pins, *source))
    if other_pins:
        commands.append(pip_install(python, other_pins))
    return " && ".join(commands)


def profile_install(python: str, profile: Profile) -> str:
    return f"internlm-kit install --profile {profile.name} --python {shlex.quote(python)}"
