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


# The InternLM2 repos a folder's shape identifies: (hidden_size, num_hidden_layers) -> repo, chat
# variant first. Only the hub's own releases: a shape that matches none is not guessed at.
KNOWN_SHAPES = {
    (2048, 24): ("internlm/internlm2-chat-1_8b", "internlm/internlm2-1_8b"),
    (4096, 32): ("internlm/internlm2-chat-7b", "internlm/internlm2-7b"),
    (6144, 48): ("internlm/internlm2-chat-20b", "internlm/internlm2-20b"),
}
DEFAULT_REPO = "internlm/internlm2-chat-1_8b"


def has_chat_template(folder_path) -> bool:
    import json
    from pathlib import Path

    try:
        data = json.loads((Path(folder_path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("chat_template"))


def repo_from_shape(config: dict, folder_path) -> tuple[str, str] | None:
    """(repo, why) for an InternLM2 config whose width and depth match a hub release."""
    if config.get("model_type") not in (None, "internlm2"):
        return None
    shape = (config.get("hidden_size"), config.get("num_hidden_layers"))
    if shape not in KNOWN_SHAPES:
        return None
    chat, base = KNOWN_SHAPES[shape]
    if has_chat_template(folder_path):
        return chat, f"inferred from config.json's shape (hidden {shape[0]} x {shape[1]} layers) and its chat template"
    return base, f"inferred from config.json's shape (hidden {shape[0]} x {shape[1]} layers, no chat template)"


# --- fixers: what `doctor --fix` does for a failing check (beside the fix text the check prints) ---
# A fixer reads the same facts the check read and returns requirements for the one combined
# resolution, or a folder repair, or nothing (the check's own fix is then printed as a step).

FIXERS: dict = {}


def fixer(check_id: str):
    def register(function):
        FIXERS[check_id] = function
        return function

    return register


def _fitting_pin(ctx, package: str) -> str:
    """The fix profile's pin when every installed requirer accepts it, else the package unpinned."""
    from setup_kit.checks.packages import _requirement_fix

    return _requirement_fix(ctx, package)


@fixer("packages.required")
def add_missing(ctx, result) -> dict:
    from setup_kit.checks.packages import ENGINE_PACKAGES, REQUIRED

    required = ENGINE_PACKAGES.get(ctx.engine, REQUIRED) if ctx.engine else REQUIRED
    return {"requirements": [_fitting_pin(ctx, name) for name in required if not ctx.env.has(name)]}


@fixer("packages.dependencies")
def meet_dependencies(ctx, result) -> dict:
    from packaging.requirements import Requirement

    from setup_kit.checks.packages import dependency_problems

    packages = dict.fromkeys(Requirement(req).name for _, _, req, _ in dependency_problems(ctx))
    return {"requirements": [_fitting_pin(ctx, name) for name in packages]}


@fixer("packages.pins")
def move_to_pins(ctx, result) -> dict:
    from setup_kit.checks.packages import _same

    if ctx.profile is None:
        return {}
    return {"requirements": [p.requirement for p in ctx.profile.pins
                             if not (ctx.env.version(p.name) and _same(ctx.env.version(p.name), p.version))]}


def _download_repair(ctx, result) -> dict:
    import re

    match = re.search(r"internlm-kit download (\S+) --local-dir ('[^']*'|\S+)", result.fix or "")
    if not match:
        return {}
    import shlex

    return {"download": (match.group(1), shlex.split(match.group(2))[0])}


for _id in ("model.config", "model.tokenizer", "model.weights", "model.remote-code"):
    fixer(_id)(_download_repair)
