"""The known-failure rules of `envs/known_issues.toml`, and matching them against facts."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from setup_kit.errors import KitError
from setup_kit.locations import envs_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class Rule:
    id: str
    symptom: str
    cause: str
    fix: str
    severity: str = "fail"
    when: dict = field(default_factory=dict, hash=False)
    explains: tuple[str, ...] = ()  # texts of a rehearsal's exception this rule explains (any one)


@lru_cache(maxsize=4)
def load_rules(path: str | None = None) -> tuple[Rule, ...]:
    source = path or str(envs_dir() / "known_issues.toml")
    try:
        with open(source, "rb") as handle:
            data = tomllib.load(handle)
        return tuple(Rule(r["id"], r["symptom"], r["cause"], r["fix"], r.get("severity", "fail"),
                          r.get("when", {}), tuple(r.get("explains", ()))) for r in data.get("rule", []))
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise KitError(f"Cannot read the known-issue rules {source}: {exc}.",
                       "Reinstall internlm-kit, or fix the file (each [[rule]] needs id, symptom, cause, fix).")


def _installed_matches(env, wanted: dict) -> bool:
    for name, spec in wanted.items():
        version = env.version(name)
        if version is None:
            return False
        if spec.strip() not in ("", "*"):
            try:
                if not SpecifierSet(spec).contains(version, prereleases=True):
                    return False
            except InvalidSpecifier:
                return False
    return True


def _remote_code_text(model) -> str:
    if model is None or not model.uses_remote_code:
        return ""
    parts = []
    for name in model.remote_code_files:
        try:
            parts.append((model.path / name).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return "\n".join(parts)


def rule_matches(rule: Rule, env, model, code: str | None = None) -> bool:
    when = rule.when
    if "installed" in when and not _installed_matches(env, when["installed"]):
        return False
    if any(env.has(name) for name in when.get("missing", [])):
        return False
    if "python" in when and not SpecifierSet(when["python"]).contains(env.python_version, prereleases=True):
        return False
    if "platform" in when and not env.markers.get("sys_platform", "").startswith(when["platform"]):
        return False
    if any(env.environment.get(name) != value for name, value in when.get("env", {}).items()):
        return False
    if "remote_code_contains" in when:
        text = _remote_code_text(model) if code is None else code
        if not text or not all(needle in text for needle in when["remote_code_contains"]):
            return False
    return True


def match_rules(rules, env, model=None) -> list[Rule]:
    code = _remote_code_text(model)
    # A rule with exception_contains explains a failed rehearsal (rules_for_exception), never predicts one.
    return [rule for rule in rules if "exception_contains" not in rule.when and rule_matches(rule, env, model, code)]


def rules_for_exception(rules, env, model, rehearsal) -> list[Rule]:
    """The rules that explain a failed rehearsal, whose environment conditions hold: a rehearsal-only rule
    (`when.exception_contains`: every text in the exception's 'Type: message', its frame or its code line,
    or the chat-token problem) or a predicting rule whose `explains` names any one text found there."""
    text = "\n".join(filter(None, (rehearsal.exception, rehearsal.where, rehearsal.code,
                                   rehearsal.token_problem or "", rehearsal.note)))
    found = []
    for rule in rules:
        needles = rule.when.get("exception_contains")
        if needles:
            if not all(n in text for n in needles):
                continue
        elif not rule.explains or not any(n in text for n in rule.explains):
            continue
        if rehearsal.engine not in rule.when.get("engines", [rehearsal.engine]):
            continue
        plain = Rule(rule.id, rule.symptom, rule.cause, rule.fix, rule.severity,
                     {k: v for k, v in rule.when.items() if k not in ("exception_contains", "engines")})
        if rule_matches(plain, env, model):
            found.append(rule)
    return found
