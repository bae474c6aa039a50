"""`internlm-kit serve`."""

from __future__ import annotations

import typer


def command() -> None:
    """(being built)"""
    raise typer.Exit(2)
