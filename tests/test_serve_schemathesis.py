"""Schemathesis against the server's own /openapi.json: no value the schema accepts, and no malformed
body, ever gets a 5xx. A bounded run (fixed seed, examples per operation, a time budget) from a
throwaway venv holding only schemathesis, so its pytest plugin stays out of the kit's environment.
"""

from __future__ import annotations

import subprocess

import pytest
from fixtures.servers import start_kit_server
from fixtures.venvs import cached_venv

SCHEMATHESIS = ["schemathesis==4.32.5", "hypothesis==6.130.12"]


@pytest.fixture(scope="module")
def schemathesis_exe():
    return cached_venv("schemathesis", SCHEMATHESIS).with_name("schemathesis")


@pytest.mark.slow
def test_no_request_schemathesis_makes_gets_a_server_error(schemathesis_exe, tiny_model_and_tokenizer, tmp_path):
    # Short default replies keep the run's many generations quick; fuzzed max_tokens still apply.
    server = start_kit_server(tiny_model_and_tokenizer, default_max_tokens=4, max_queue=64)
    try:
        done = subprocess.run(
            [str(schemathesis_exe), "run", server.base + "/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "40", "--seed", "10", "--workers", "2", "--max-time", "35",
             "--phases", "coverage,fuzzing",
             "--request-timeout", "30", "--suppress-health-check", "all", "--no-color"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    finally:
        server.stop()
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert "Tested: 5" in done.stdout and " failed" not in done.stdout, report  # every operation, none failing
