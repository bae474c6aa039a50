"""The doctor against real throwaway venvs with real old packages (built once per session)."""

from __future__ import annotations

import subprocess

import pytest

from fixtures.model_folders import make_model_folder
from test_doctor import assert_contract, by_id, doctor_json

pytestmark = pytest.mark.slow

STATIC_CACHE_CODE = '''"""The remote code's imports as of hub commit f217a2f (June 2024)."""
import torch
from einops import rearrange
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.utils import logging
try:
    from flash_attn import flash_attn_func
except ImportError:
    pass
'''


def test_transformers_4_34_with_hub_upgraded_over_it(old_transformers_venv, tmp_path, no_gpu):
    """The early tutorial's environment after `pip install huggingface-hub==0.24.2`: transformers 4.34,
    no protobuf/accelerate/torch, tokenizers 0.14.1 vs huggingface-hub 0.24.2; and the current
    remote code, which needs StaticCache."""
    model = make_model_folder(tmp_path / "internlm2-chat-1_8b", modeling=STATIC_CACHE_CODE)
    report, result = doctor_json("--python", str(old_transformers_venv), "--model", str(model), env=no_gpu)
    assert_contract(report, result)
    checks = by_id(report)
    python = str(old_transformers_venv)
    assert report["target"]["python"] == python and report["ok"] is False

    required = checks["packages.required"]
    assert required["status"] == "fail"
    assert required["summary"] == "missing: torch, sentencepiece, einops, protobuf, accelerate"
    # The fix moves the whole stack to the nearest profile (tutorial), whose pins resolve together.
    for pin in ('"transformers==4.38.2"', '"tokenizers==0.15.2"', '"huggingface-hub==0.24.6"',
                '"protobuf==5.27.2"', '"accelerate==0.33.0"', '"torch==2.1.2"'):
        assert pin in required["fix"]
    assert f"internlm-kit install --profile tutorial --python {python}" in required["fix"]

    dependencies = checks["packages.dependencies"]
    assert dependencies["status"] == "fail"
    assert dependencies["summary"].startswith("tokenizers 0.14.1 requires huggingface_hub<0.18,>=0.16.4, "
                                              "but you have huggingface-hub 0.24.2 which is incompatible.")
    # every installed requirer's range at once (tokenizers <0.18, transformers <1.0)
    assert dependencies["fix"] == f'{python} -m pip install "huggingface_hub<0.18,<1.0,>=0.16.4"'

    known = " ".join(checks["known-issues"]["details"])
    for rule in ("protobuf-missing", "accelerate-missing-old-transformers", "tokenizers-0.14-hub-too-new"):
        assert f"[{rule}] you would see" in known
    assert "InternLM2Converter requires the protobuf library" in known
    # the import check below reports StaticCache; the rule about it does not count it a second time
    assert "[remote-code-needs-static-cache] left to model.remote-code-imports" in known

    imports = checks["model.remote-code-imports"]
    # internlm-kit is not installed in that venv, so the doctor assumes what runs there is the remote code
    assert report["target"]["engine"] == "remote-code"
    assert imports["status"] == "fail"
    assert "from transformers.cache_utils import" in imports["summary"]
    assert "No module named 'transformers.cache_utils'" in imports["summary"]
    assert "FAIL import einops" in " ".join(imports["details"])
    assert '"einops==0.8.0"' in imports["fix"] and '"transformers==4.38.2"' in imports["fix"]
    assert not any("flash_attn" in d for d in imports["details"])  # guarded by try: not required

    assert checks["torch.import"]["status"] == "skip"  # missing torch is packages.required's failure
    assert report["target"]["profile"] is None and "transformers 4.34.0" in report["target"]["profile_reason"]
    assert checks["packages.pins"]["status"] == "skip"

    # With the tutorial profile named explicitly, the pins and the Python range are checked too.
    report, _ = doctor_json("--python", python, "--profile", "tutorial", "--only", "packages.pins,python",
                            env=no_gpu)
    pins = by_id(report)["packages.pins"]
    assert pins["status"] == "fail" and pins["summary"].startswith("12 of 12 pins of profile tutorial differ")
    assert "transformers: 4.34.0 (pinned 4.38.2)  <- differs" in pins["details"]
    assert pins["fix"].startswith(f"internlm-kit install --profile tutorial --python {python}")
    assert by_id(report)["python.version"]["status"] == "ok"


def test_the_dependency_fix_really_resolves_the_conflict(tokenizers_conflict_venv, no_gpu):
    """tokenizers 0.14.1 then huggingface-hub 0.24.2 over it: the doctor's fix, run as printed,
    leaves an environment where the check passes."""
    python = str(tokenizers_conflict_venv)
    report, result = doctor_json("--python", python, "--only", "packages.dependencies", env=no_gpu)
    check = by_id(report)["packages.dependencies"]
    assert check["status"] == "fail" and result.returncode == 1
    assert check["summary"] == ("tokenizers 0.14.1 requires huggingface_hub<0.18,>=0.16.4, "
                                "but you have huggingface-hub 0.24.2 which is incompatible.")
    fix = check["fix"]
    assert fix.startswith(f"{python} -m pip install ")
    subprocess.run(fix, shell=True, check=True, capture_output=True, timeout=300)
    report, result = doctor_json("--python", python, "--only", "packages.dependencies", env=no_gpu)
    assert by_id(report)["packages.dependencies"]["status"] == "ok", report
    assert result.returncode == 0


@pytest.mark.slow
def test_a_distribution_whose_metadata_cannot_be_read_is_named_with_a_fix_that_mends_it(tmp_path, no_gpu):
    """A half-written install (METADATA emptied) is not dropped from the dependency check in silence:
    the doctor names its folder, and the command it prints brings the package back readable."""
    from fixtures.venvs import make_venv, pip_install

    python = make_venv(tmp_path / "venv", with_pip=True)
    pip_install(python, "six==1.16.0")
    dist_info = next((tmp_path / "venv").glob("lib/python*/site-packages/six-1.16.0.dist-info"))
    (dist_info / "METADATA").write_text("", encoding="utf-8")

    report, _ = doctor_json("--python", str(python), "--only", "packages.dependencies", env=no_gpu)
    check = by_id(report)["packages.dependencies"]
    assert check["status"] == "warn", check
    assert str(dist_info) in check["summary"] and "not checked" in check["summary"]
    fix = subprocess.run(["bash", "-c", check["fix"]], capture_output=True, text=True, timeout=300)
    assert fix.returncode == 0, fix.stdout + fix.stderr

    report, _ = doctor_json("--python", str(python), "--only", "packages.dependencies", env=no_gpu)
    assert by_id(report)["packages.dependencies"]["status"] == "ok"
    imported = subprocess.run([str(python), "-c", "import six, importlib.metadata as m; print(m.version('six'))"],
                              capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "1.16.0", imported.stderr
