"""Fixtures live in tests/fixtures/, one module per kind of situation a user is in."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

pytest_plugins = [
    "fixtures.models",   # tiny InternLM2 checkpoints and tokenizers
    "fixtures.remote_code",  # a tiny InternLM2 folder whose remote code runs (transformers 4.38)
    "fixtures.rehearsal_revisions",  # stand-ins of the hub's three remote-code revisions (issue 9)
    "fixtures.venvs",    # throwaway virtual environments with real (old) packages
    "fixtures.hub",      # a hub-compatible HTTP server on 127.0.0.1
    "fixtures.modelscope_hub",  # a ModelScope-compatible hub on 127.0.0.1, for the real modelscope package
    "fixtures.gpu",      # fake nvidia-smi executables printing real drivers' output
    "fixtures.servers",  # OpenAI-compatible servers started on 127.0.0.1
]


CHROMIUM_MISSING = ("Chromium is missing (the chat page's browser tests drive Debian's chromium): "
                    "run `make setup` as root or with passwordless sudo, or `sudo apt-get install -y chromium`")


def chromium_path() -> str | None:
    """Debian's chromium; INTERNLM_KIT_CHROMIUM names another binary (a missing path: none)."""
    named = os.environ.get("INTERNLM_KIT_CHROMIUM")
    if named is not None:
        return named if os.path.isfile(named) else None
    return shutil.which("chromium") or (("/usr/bin/chromium") if os.path.isfile("/usr/bin/chromium") else None)


def pytest_configure(config):
    """A shell that starts `make test` in the background (`nohup make test &`, some CI runners) leaves
    SIGINT ignored, and every process the tests start inherits that: the Ctrl-C tests would then
    find the kit deaf to Ctrl-C. Restoring Python's own handler here gives each child the default
    disposition again (a handler, unlike an ignore, does not survive exec)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Without Chromium the browser tests are skipped with the command that brings it, except under
    CI=true, where they run and fail: a CI machine that cannot run them must not look green."""
    if chromium_path() is not None or os.environ.get("CI", "").lower() == "true":
        return
    skip = pytest.mark.skip(reason=CHROMIUM_MISSING)
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)
