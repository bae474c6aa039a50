"""Checks of the target Python environment: its Python, its packages, their pins and dependencies."""

from __future__ import annotations

from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from setup_kit.checks.base import Context, Result, check, count, fail, ok, skip, warn
from setup_kit.checks.fixes import install_pins, pip_install, profile_install
from setup_kit.checks.known_issues import load_rules, match_rules

ENV = "Python environment"
# What the model needs, whatever the engine (the remote-code path adds einops and accelerate).
REQUIRED = ("torch", "transformers", "sentencepiece", "einops", "protobuf", "accelerate")
# What each engine needs installed (the preflight checks only these).
ENGINE_PACKAGES = {
    "native": ("torch", "transformers", "safetensors", "tokenizers", "sentencepiece", "protobuf"),
    "remote-code": REQUIRED,
    "openai": (),
}


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _same(installed: str, pinned: str) -> bool:
    """Equal as releases: 2.13.0+cpu is the pinned 2.13.0."""
    a, b = _version(installed), _version(pinned)
    return a is not None and b is not None and a.public == b.public


@check("python.version", ENV, "Python version vs the profile", needs=("env",))
def python_version(ctx: Context) -> Result:
    version = ctx.env.python_version
    where = f"Python {version} at {ctx.env.executable}"
    if ctx.profile is None:
        from setup_kit.profiles import available_profiles

        profiles = list(available_profiles().values())
        fits = [p.name for p in profiles if SpecifierSet(p.python).contains(version, prereleases=True)]
        if fits:
            return ok(where, f"No profile chosen; profiles for this Python: {', '.join(fits)}.")
        everywhere = [f"3.{minor}" for minor in range(8, 16)
                      if all(SpecifierSet(p.python).contains(f"3.{minor}.0") for p in profiles)]
        use = everywhere[-1] if everywhere else "3.11"
        return warn(f"{where}: no profile in envs/ supports this Python",
                    f"Use Python {' or '.join(everywhere) or use} (every profile supports it), e.g. "
                    f"`uv venv --python {use} ~/envs/internlm`")
    spec = SpecifierSet(ctx.profile.python)
    if spec.contains(version, prereleases=True):
        return ok(f"{where} (profile {ctx.profile.name} wants {spec})")
    summary = f"{where}, but profile {ctx.profile.name} needs Python {spec}"
    fix = (f"Create an environment with a Python the profile supports, e.g. "
           f"`uv venv --python 3.11 ~/envs/internlm && internlm-kit install --profile {ctx.profile.name} "
           f"--python ~/envs/internlm/bin/python` (or conda create -n internlm python=3.11)")
    why = "torch 2.1.2 and sentencepiece 0.1.99 have no Python 3.12 wheels." if ctx.profile.name == "tutorial" else ""
    return (fail if ctx.profile_explicit else warn)(summary, fix, *([why] if why else []))


def _moves_to_profile(ctx: Context, names: list[str]) -> str:
    """Install the missing ones pinned, moving the profile's other installed-but-different
    pins along with them so the result is the profile's stack, which resolves together."""
    profile = ctx.fix_profile
    if profile is None:
        return pip_install(ctx.python, names)
    pins = []
    for pin in profile.pins:
        installed = ctx.env.version(pin.name)
        missing = canonicalize_name(pin.name) in {canonicalize_name(n) for n in names}
        differs = installed is not None and pin.group != "torch" and not _same(installed, pin.version)
        if missing or differs:
            pins.append(pin)
    unpinned = [n for n in names if profile.pin(n) is None]
    command = install_pins(ctx.python, profile, pins)
    if unpinned:
        command = " && ".join(filter(None, [command, pip_install(ctx.python, unpinned)]))
    return f"{command}   (the {profile.name} profile's versions; or: {profile_install(ctx.python, profile)})"


@check("packages.required", ENV, "Required packages installed", needs=("env",))
def required_packages(ctx: Context) -> Result:
    required = ENGINE_PACKAGES.get(ctx.engine, REQUIRED) if ctx.engine else REQUIRED
    missing = [name for name in required if not ctx.env.has(name)]
    present = [f"{name} {ctx.env.version(name)}" for name in required if ctx.env.has(name)]
    if not missing:
        return ok(f"{', '.join(required) or 'nothing'} installed" +
                  (f" (what the {ctx.engine} engine needs)" if ctx.engine else ""), *present)
    details = [f"installed: {', '.join(present)}"] if present else []
    return fail(f"missing: {', '.join(missing)}", _moves_to_profile(ctx, missing), *details)


@check("packages.pins", ENV, "Installed versions vs the profile's pins", needs=("env",))
def pinned_versions(ctx: Context) -> Result:
    if ctx.profile is None:
        return skip("no profile chosen (pass --profile tutorial|current|cpu to compare pins)")
    differ, details = [], []
    for pin in ctx.profile.pins:
        installed = ctx.env.version(pin.name)
        same = installed is not None and _same(installed, pin.version)
        details.append(f"{pin.name}: {installed or 'missing'} (pinned {pin.version}){'' if same else '  <- differs'}")
        if not same:
            differ.append(pin)
    if not differ:
        return ok(f"all {len(ctx.profile.pins)} pins of profile {ctx.profile.name} match", *details)
    summary = (f"{len(differ)} of {len(ctx.profile.pins)} pins of profile {ctx.profile.name} differ: "
               + ", ".join(f"{p.name} {ctx.env.version(p.name) or 'missing'} != {p.version}" for p in differ[:4])
               + (", ..." if len(differ) > 4 else ""))
    fix = f"{profile_install(ctx.python, ctx.profile)}   (or: {install_pins(ctx.python, ctx.profile, differ)})"
    return (fail if ctx.profile_explicit else warn)(summary, fix, *details)


def dependency_problems(ctx: Context) -> list[tuple[str, str, str, str | None]]:
    """Like `pip check`: (requirer, its version, requirement, installed version or None)
    for every Requires-Dist (no extras) of every installed distribution that is not met."""
    markers = dict(ctx.env.markers, extra="")
    problems = []
    for dist in ctx.env.distributions.values():
        for line in dist.requires:
            try:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate(markers):
                    continue
            except (InvalidRequirement, InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
                continue
            installed = ctx.env.version(req.name)
            if installed is None or not req.specifier.contains(installed, prereleases=True):
                problems.append((dist.name, dist.version, str(req), installed))
    return problems


def _requirement_fix(ctx: Context, package: str) -> str:
    """One requirement for `package` that every installed requirer accepts, pinned when the
    profile's pin fits (pip would otherwise pick the newest version in the range)."""
    markers = dict(ctx.env.markers, extra="")
    combined = SpecifierSet()
    for dist in ctx.env.distributions.values():
        for line in dist.requires:
            try:
                req = Requirement(line)
                if canonicalize_name(req.name) == canonicalize_name(package) and (
                        req.marker is None or req.marker.evaluate(markers)):
                    combined &= req.specifier
            except (InvalidRequirement, InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
                continue
    pin = ctx.fix_profile.pin(package) if ctx.fix_profile else None
    if pin is not None and combined.contains(pin.version, prereleases=True):
        return pin.requirement
    return f"{package}{combined}"


def _installed_name(ctx: Context, requirement: str) -> str:
    from setup_kit.probe import canonical

    return ctx.env.distributions[canonical(Requirement(requirement).name)].name


def _unreadable_lines(ctx: Context) -> tuple[list[str], list[str]]:
    """(what is wrong, the command that mends it) for each installed distribution whose metadata
    the doctor could not read: its requirements are unknown, to the doctor and to pip check alike."""
    import re
    import shlex
    from pathlib import Path

    lines, fixes = [], []
    for entry in ctx.env.unreadable:
        path = entry.get("path") or ""
        name, version = entry.get("name"), entry.get("version")
        folder = Path(path).name
        found = re.match(r"^(?P<name>[^-]+)-(?P<version>[^-]+?)(?:-py[^-]*)?\.(?:dist|egg)-info$", folder)
        if found and not name:
            name, version = found["name"], found["version"]
        lines.append(f"{path or 'an installed distribution'}: {entry.get('error', 'unreadable metadata')}")
        if name and path:
            spec = f"{name}=={version}" if version else name
            fixes.append(f"rm -rf {shlex.quote(path)} && {pip_install(ctx.python, [spec], '--no-deps')}")
        elif path:
            fixes.append(f"rm -rf {shlex.quote(path)}   (then reinstall the package it belonged to)")
    return lines, fixes


@check("packages.dependencies", ENV, "Every package's requirements met (pip check)", needs=("env",))
def dependencies(ctx: Context) -> Result:
    problems = dependency_problems(ctx)
    unreadable, mends = _unreadable_lines(ctx)
    if not problems and unreadable:
        n = len(unreadable)
        return warn(f"{n} installed distribution{'s' if n > 1 else ''} with metadata that cannot be read, so "
                    f"{'their' if n > 1 else 'its'} requirements are not checked: {unreadable[0]}",
                    " && ".join(mends) or None, *unreadable)
    if not problems:
        return ok(f"the requirements of all {len(ctx.env.distributions)} installed distributions are met")
    # pip's own wording, which users search for; version conflicts before missing packages.
    problems.sort(key=lambda p: p[3] is None)
    lines = [f"{name} {version} requires {req}, but you have {_installed_name(ctx, req)} {have} which is incompatible."
             if have else f"{name} {version} requires {req}, which is not installed."
             for name, version, req, have in problems]
    packages = list(dict.fromkeys(Requirement(req).name for _, _, req, _ in problems))
    fix = pip_install(ctx.python, [_requirement_fix(ctx, p) for p in packages])
    return fail(lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""), fix, *lines,
                *(f"not checked: {line}" for line in unreadable))


@check("known-issues", ENV, "Known InternLM2 environment failures", needs=("env",))
def known_issues(ctx: Context) -> Result:
    rules = load_rules()
    matched = match_rules(rules, ctx.env, ctx.model)
    details: list[str] = []
    left: list = []  # rules left to model.remote-code-imports
    if any("statement" in r and not r["ok"] for r in ctx.imports or []):
        # model.remote-code-imports reports this transformers failing the remote code, with its fix:
        # a rule about the same code would count that cause twice.
        left = [r for r in matched if "remote_code_contains" in r.when]
        matched = [r for r in matched if r not in left]
        details += [f"[{r.id}] left to model.remote-code-imports: the remote code does not import here" for r in left]
    rehearsed = (ctx.rehearsal or {}).get("remote-code")
    if rehearsed is not None and rehearsed.passed:
        # The folder's own remote code just ran here as the tutorial runs it: a rule predicting that
        # it fails is contradicted by the run (e.g. get_max_cache_shape on 4.38, whose generate never
        # hands the model a Cache object), and running the code knows.
        ran = [r for r in matched if "remote_code_contains" in r.when]
        matched = [r for r in matched if r not in ran]
        details += [f"[{r.id}] predicted a failure of this remote code, but the rehearsal ran it here "
                    "(model.rehearsal.remote-code)" for r in ran]
    if not matched:
        besides = " besides the remote code's (model.remote-code-imports)" if left else ""
        return ok(f"none of the {len(rules)} known failures match this environment{besides}", *details)
    values = {"python": ctx.python, "model": str(ctx.model_path or "MODEL_DIR")}
    fixes = []
    for rule in matched:
        fix = rule.fix.format(**values)
        fixes.append(fix)
        details += [f"[{rule.id}] you would see: {rule.symptom}", f"    cause: {rule.cause}", f"    fix: {fix}"]
    # A rule about the remote code's text is that code failing, and only the remote-code engine runs it.
    blocking = [r for r in matched if r.severity == "fail"
                and (ctx.engine == "remote-code" or "remote_code_contains" not in r.when)]
    severity = "fail" if blocking else "warn"
    summary = f"{count(len(matched), 'known failure')} match{'es' if len(matched) == 1 else ''}: {matched[0].symptom}"
    return (fail if severity == "fail" else warn)(summary, "\n".join(dict.fromkeys(fixes)), *details)


def supported_transformers(requires: list[str] | None = None) -> SpecifierSet | None:
    """The transformers range the kit supports, as its own metadata says (pyproject.toml's `chat`
    extra, the one place it is written)."""
    if requires is None:
        from importlib import metadata

        try:
            requires = metadata.requires("internlm-kit") or []
        except metadata.PackageNotFoundError:
            return None
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == "transformers":
            return req.specifier
    return None


@check("packages.transformers-range", ENV, "transformers within the range the kit supports", needs=("env",))
def transformers_range(ctx: Context) -> Result:
    installed = ctx.env.version("transformers")
    supported = supported_transformers()
    if installed is None or supported is None:
        return skip("transformers is not installed" if installed is None else "the kit's metadata is not readable")
    if supported.contains(installed, prereleases=True):
        return ok(f"transformers {installed} is within {supported}")
    if ctx.engine not in (None, "native"):
        return warn(f"transformers {installed} is outside {supported}, the range the native engine supports",
                    pip_install(ctx.python, [f"transformers{supported}"]))
    return fail(f"transformers {installed} is outside {supported}: the native engine needs the Llama layout, "
                "cache and mask APIs of these releases (older ones lack them; newer ones are untested)",
                pip_install(ctx.python, [f"transformers{supported}"]))
