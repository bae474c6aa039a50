"""The doctor refuses, for the native engine, a transformers the kit's requirement excludes."""

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from setup_kit.checks.base import Context
from setup_kit.checks.packages import supported_transformers, transformers_range
from setup_kit.probe import EnvironmentFacts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def kit_metadata_from_pyproject(monkeypatch):
    # What an install of this checkout's pyproject.toml writes into the kit's metadata.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requires = [f"{r}; extra == '{extra}'" for extra, reqs in extras.items() for r in reqs]
    real = metadata.requires
    monkeypatch.setattr(metadata, "requires", lambda name: requires if name == "internlm-kit" else real(name))


def with_transformers(version: str) -> Context:
    env = EnvironmentFacts.from_json({"python": {"executable": "/venv/bin/python", "version": "3.11.9"},
                                      "platform": {}, "distributions": [{"name": "transformers", "version": version}]})
    return Context(python="/venv/bin/python", env=env, engine="native")


def test_the_supported_range_covers_every_tested_stack_and_excludes_older_releases(kit_metadata_from_pyproject):
    supported = supported_transformers()
    assert all(supported.contains(v) for v in ("4.38.2", "4.46.3", "4.57.6", "5.24.0"))
    assert not supported.contains("4.37.2") and not supported.contains("4.34.0")


def test_the_doctor_refuses_an_older_transformers_for_the_native_engine_with_a_pasteable_fix(kit_metadata_from_pyproject):
    result = transformers_range(with_transformers("4.37.2"))
    assert result.status == "fail" and "4.37.2" in result.summary and "native engine" in result.summary
    assert '/venv/bin/python -m pip install "transformers<6,>=4.38"' in result.fix
    assert transformers_range(with_transformers("4.46.3")).status == "ok"
