"""Where the kit keeps things: shipped data, its state, downloaded models."""

from __future__ import annotations

import os
from pathlib import Path

from setup_kit import DEFAULT_REPO


def envs_dir() -> Path:
    """The `envs/` data folder: inside the wheel, or at the repository root in a checkout."""
    packaged = Path(__file__).with_name("envs")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "envs"


def state_dir() -> Path:
    """Snapshots, caches of converted models and the like (``INTERNLM_KIT_STATE_DIR`` overrides)."""
    if env := os.environ.get("INTERNLM_KIT_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "internlm-kit"


def models_dir() -> Path:
    """Where `download` puts models by default (``INTERNLM_KIT_MODELS`` overrides)."""
    if env := os.environ.get("INTERNLM_KIT_MODELS"):
        return Path(env)
    return Path.home() / "models"


def default_model_dir(repo: str = DEFAULT_REPO) -> Path:
    """The folder a hub repo lands in. No '.' in the name: it breaks remote-code imports."""
    name = repo.rstrip("/").split("/")[-1].replace(".", "_")
    return models_dir() / name
