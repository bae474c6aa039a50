"""`internlm-kit install`: a profile from `envs/` turned into a working environment, safely.

profile -> target -> plan (exact pip/uv commands) -> resolve without installing -> snapshot of
what is there -> install -> the doctor's package checks. Nothing changes when the plan cannot
resolve; every install can be undone with `rollback` (the snapshot is restored exactly).
"""

from __future__ import annotations

from setup_kit.install.flow import InstallOptions, InstallOutcome, install, rollback

__all__ = ["InstallOptions", "InstallOutcome", "install", "rollback"]
