"""The known-issue rules are data: every shipped rule is well formed, and a new rule in a TOML file
is picked up and matched with no Python change. Also the pure pieces of the CUDA reasoning."""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from setup_kit.checks.gpu import min_driver, torch_variant_for_driver
from setup_kit.checks.known_issues import load_rules, match_rules
from setup_kit.probe import EnvironmentFacts, in_process_environment


def facts(packages: dict[str, str], environment: dict | None = None) -> EnvironmentFacts:
    """Facts as the stdlib probe reports them, for an environment holding `packages`."""
    here = in_process_environment()
    return EnvironmentFacts(here.python, here.platform, here.markers,
                            EnvironmentFacts.from_json({"python": {}, "platform": {}, "distributions": [
                                {"name": n, "version": v} for n, v in packages.items()]}).distributions,
                            environment or {})


def test_every_shipped_rule_is_well_formed():
    rules = load_rules()
    assert len(rules) >= 15  # DESIGN.md's known failures (flash_attn is model.remote-code-imports' job)
    assert len({r.id for r in rules}) == len(rules)
    allowed = {"installed", "missing", "python", "platform", "remote_code_contains", "env", "exception_contains",
               "engines"}
    for rule in rules:
        assert rule.symptom and rule.cause and rule.fix and rule.severity in ("fail", "warn"), rule.id
        assert rule.when and set(rule.when) <= allowed, rule.id
        for spec in rule.when.get("installed", {}).values():
            if spec != "*":
                SpecifierSet(spec)  # raises on a typo
        rule.fix.format(python="PY", model="DIR")  # only the documented placeholders


def test_the_tutorials_errors_are_matched_by_installed_versions():
    env = facts({"transformers": "4.34.0", "tokenizers": "0.14.1", "huggingface-hub": "0.24.2"})
    ids = {r.id for r in match_rules(load_rules(), env)}
    assert ids == {"protobuf-missing", "accelerate-missing-old-transformers", "tokenizers-0.14-hub-too-new"}
    fine = facts({"transformers": "4.38.2", "tokenizers": "0.15.2", "huggingface-hub": "0.24.6",
                  "protobuf": "5.27.2", "accelerate": "0.33.0", "torch": "2.1.2", "numpy": "1.26.4"})
    assert match_rules(load_rules(), fine) == []
    numpy2 = facts({"torch": "2.1.2", "numpy": "2.0.0"})
    assert [r.id for r in match_rules(load_rules(), numpy2)] == ["numpy-2-with-old-torch"]
    transfer = facts({}, {"HF_HUB_ENABLE_HF_TRANSFER": "1"})
    assert [r.id for r in match_rules(load_rules(), transfer)] == ["hf-transfer-missing"]


def test_a_new_rule_needs_only_a_toml_block(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('''
[[rule]]
id = "streamlit-too-new"
severity = "warn"
when = { installed = { streamlit = ">=1.40" }, python = ">=3.8" }
symptom = "the web demo's layout breaks"
cause = "a made-up incompatibility, for this test"
fix = '{python} -m pip install "streamlit==1.37.0"'
''')
    rules = load_rules(str(path))
    assert [r.id for r in match_rules(rules, facts({"streamlit": "1.41.0"}))] == ["streamlit-too-new"]
    assert match_rules(rules, facts({"streamlit": "1.37.0"})) == []


def test_driver_table_and_torch_variants():
    assert min_driver("12.1") == "530.30.02"
    assert min_driver("12.3") == "535.54.03"  # not listed: the nearest lower toolkit of the same major
    assert min_driver("10.2") is None
    assert torch_variant_for_driver("2.5.1+cu124", "535.129.03") == ("12.1", True)
    assert torch_variant_for_driver("2.5.1", "560.35.03") == ("12.4", True)
    assert torch_variant_for_driver("2.5.1", "470.182.03") == ("11.8", False)  # minor-version compatibility
    assert torch_variant_for_driver("2.9.0", "418.67") is None


def test_the_remote_code_imports_worth_trying_are_the_unguarded_ones(tmp_path):
    from fixtures.model_folders import make_model_folder
    from setup_kit.checks.model import remote_code_imports
    from setup_kit.modelfolder import inspect_model_folder

    modeling = '''
import math
import torch
from einops import rearrange
from transformers.utils import is_flash_attn_2_available, logging
from .configuration_internlm2 import InternLM2Config
if is_flash_attn_2_available():
    from flash_attn import flash_attn_func
try:
    import flash_attn
except ImportError:
    pass


def _varlen():
    from flash_attn.bert_padding import pad_input  # unguarded: transformers' check_imports requires it too
'''
    folder = inspect_model_folder(make_model_folder(tmp_path / "m", modeling=modeling))
    items = [(i.get("statement") or "import " + i["module"]) for i in remote_code_imports(folder)
             if i["file"] == "modeling_internlm2.py"]
    assert items == ["import torch", "import einops",
                     "from transformers.utils import is_flash_attn_2_available",
                     "from transformers.utils import logging", "import flash_attn"]


def test_a_check_that_crashes_becomes_an_error_result_and_the_others_still_run():
    from setup_kit.checks import Check, Context, ok, run_checks

    def broken(ctx):
        return {}["no such fact"]

    def failing_without_fix(ctx):
        from setup_kit.checks.base import Result

        return Result("fail", "something is wrong")

    checks = [Check("demo.broken", "System", "crashes", broken),
              Check("demo.unfixed", "System", "fails without a fix", failing_without_fix),
              Check("demo.fine", "System", "works", lambda ctx: ok("fine"))]
    results = run_checks(checks, Context(python="python"))
    assert [r.status for r in results] == ["error", "error", "ok"]
    assert results[0].details[0] == "KeyError: 'no such fact'"
    assert "failed without a fix" in results[1].summary  # a fail must always carry its fix
