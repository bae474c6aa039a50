"""Issue 9's matrix: in real venvs of transformers 4.34 to 5.x, on stand-ins of the hub's three remote-code
revisions, `doctor --engine remote-code` fails exactly where the tutorial's own steps (tests/fixtures/
rehearsal_oracle.py: AutoTokenizer, AutoModelForCausalLM, chat, stream_chat, nothing of the kit) fail, names
the same exception, and explains it with a known-issue rule whose fix it prints.

`python tests/fixtures/rehearsal_table.py` prints the same matrix as a table.
"""

from __future__ import annotations

import pytest

from fixtures.rehearsal_matrix import MATRIX, matrix_venv
from fixtures.rehearsal_revisions import REVISIONS
from fixtures.rehearsal_table import run_doctor, run_oracle

pytestmark = pytest.mark.slow  # builds a venv per transformers release (cached between runs)


@pytest.mark.parametrize("env", list(MATRIX))
def test_the_rehearsal_fails_exactly_where_the_tutorials_steps_fail(env, revision_folders):
    python = matrix_venv(env)
    seen = []
    for revision, folder in revision_folders.items():
        passed, exception, step = run_oracle(python, folder)
        d_passed, summary, code, fix, report = run_doctor(python, folder)
        seen.append((revision, passed, exception, summary))
        assert d_passed == passed, (revision, exception, summary)
        assert report["target"]["engine"] == "remote-code"
        if passed:
            continue
        assert code == 1, (revision, summary)
        kind = exception.split(":", 1)[0]
        assert kind and kind in summary, (revision, exception, summary)  # the real exception, named
        assert "No known rule" not in fix, (revision, exception, fix)  # and explained, with its fix
    assert len(seen) == len(REVISIONS)
