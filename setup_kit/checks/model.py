"""Checks of a model folder (`--model DIR`): the reader's problems, and whether the folder's
remote code can import in the target environment."""

from __future__ import annotations

import ast
import sys

from setup_kit.checks.base import Context, Result, check, count, fail, ok, parameters, skip, warn
from setup_kit.checks.fixes import pip_install, profile_install
from setup_kit.modelfolder import download_command

MODEL = "Model folder"
NO_MODEL = "no model folder given (--model DIR)"
NO_FOLDER = {"folder-missing": "no folder", "not-a-model-folder": "not a model folder"}


def _no_folder(ctx: Context) -> str | None:
    """Why the per-file checks have nothing to look at (model.config reports it, once)."""
    if ctx.model is None:
        return None
    return next((NO_FOLDER[p.code] for p in ctx.model.problems if p.code in NO_FOLDER), None)


def _from_problems(ctx: Context, codes: tuple[str, ...], good: str, *details: str) -> Result:
    if ctx.model is None:
        return skip(NO_MODEL)
    found = [p for p in ctx.model.problems if p.code in codes]
    if not found:
        return ok(good, *details)
    blocking = [p for p in found if p.blocking]
    strict = ctx.engine == "remote-code"  # the preflight of the engine that needs what is missing
    first = (blocking or found)[0]
    lines = [p.message for p in found] + list(details)
    fix = "\n".join(dict.fromkeys(p.fix for p in found))
    return (fail if blocking or strict else warn)(first.message, fix, *lines)


@check("model.config", MODEL, "config.json readable, a supported model_type", needs=("model",))
def config(ctx: Context) -> Result:
    good = f"model_type {ctx.model.model_type}, dtype {ctx.model.torch_dtype or '?'}" if ctx.model else ""
    return _from_problems(ctx, ("folder-missing", "not-a-model-folder", "config-missing", "config-unreadable",
                                "model-type-unsupported"), good)


@check("model.tokenizer", MODEL, "Tokenizer files present", needs=("model",))
def tokenizer(ctx: Context) -> Result:
    if reason := _no_folder(ctx):
        return skip(reason)
    good = ", ".join(ctx.model.tokenizer_files) if ctx.model else ""
    return _from_problems(ctx, ("tokenizer-missing", "tokenizer-lfs-pointer", "tokenizer-config-missing"), good)


@check("model.weights", MODEL, "Every shard present and as long as its header says", needs=("model",))
def weights(ctx: Context) -> Result:
    if reason := _no_folder(ctx):
        return skip(reason)
    folder = ctx.model
    good = ""
    details: list[str] = []
    if folder is not None:
        good = (f"{count(len(folder.weight_files), 'shard')}, {parameters(folder.parameters)}, "
                f"headers match file sizes")
        details = [f"{w.name}: {w.size:,} bytes" + (f" ({w.problem})" if w.problem else "") for w in folder.weight_files]
    return _from_problems(ctx, ("weights-missing", "index-unreadable", "shard-missing", "shard-truncated",
                                "shard-damaged", "index-mismatch"), good, *details)


@check("model.remote-code", MODEL, "Remote-code files present when auto_map names them", needs=("model",))
def remote_code(ctx: Context) -> Result:
    if ctx.model is not None and not ctx.model.uses_remote_code:
        return skip("config.json has no auto_map (no remote code needed)")
    good = ", ".join(ctx.model.remote_code_needed) if ctx.model else ""
    return _from_problems(ctx, ("remote-code-missing",), good)


@check("model.folder-name", MODEL, "No '.' in the folder name when remote code is used", needs=("model",))
def folder_name(ctx: Context) -> Result:
    if ctx.model is not None and not ctx.model.uses_remote_code:
        return skip("no remote code, any folder name works")
    good = f"'{ctx.model.path.resolve().name}' imports as a module name" if ctx.model else ""
    return _from_problems(ctx, ("dot-in-folder-name",), good)


def _guarded(node: ast.AST, parents: dict) -> bool:
    """Inside `try:` or `if is_..._available():`: optional, as transformers' own check_imports sees it."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            return True
        if isinstance(parent, ast.If) and "available" in ast.unparse(parent.test):
            return True
        node = parent
    return False


def remote_code_imports(folder) -> list[dict]:
    """The imports the remote code needs for sure (not inside try:), as probe items:
    each `from transformers... import name` executed, every other third-party package located."""
    if folder is None or not folder.uses_remote_code:
        return []
    local = {name[:-3] for name in folder.remote_code_files}
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    items: list[dict] = []
    for name in folder.remote_code_files:
        try:
            tree = ast.parse((folder.path / name).read_text(encoding="utf-8", errors="replace"))
        except (OSError, SyntaxError):
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _guarded(node, parents):
                continue
            if isinstance(node, ast.ImportFrom) and (node.level or not node.module):
                continue
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for module in modules:
                top = module.split(".")[0]
                if top in stdlib or top in local or top == "__future__":
                    continue
                if top == "transformers" and isinstance(node, ast.ImportFrom):
                    items += [{"statement": f"from {module} import {a.name}", "file": name} for a in node.names]
                else:
                    items.append({"module": top, "file": name})
    unique = {(i.get("statement"), i.get("module")): i for i in items}
    return list(unique.values())


def _imports_fix(ctx: Context, failed: list[dict]) -> str:
    installed = ctx.env.version("transformers") if ctx.env else None
    fixes = []
    missing_modules = [i["module"] for i in failed if "module" in i]
    for module in missing_modules:
        package = module.replace("_", "-")
        pin = ctx.fix_profile.pin(package) if ctx.fix_profile else None
        if module == "flash_attn":
            fixes.append(f"The latest remote code imports flash_attn only when present: {download_command(ctx.model)}")
        else:
            fixes.append(pip_install(ctx.python, [pin.requirement if pin else package]))
    if any("statement" in i for i in failed):
        from packaging.version import Version

        native = f"internlm-kit chat --engine native --model {ctx.model_path}   (needs no remote code)"
        if installed and Version(installed) >= Version("4.49"):
            fixes.append(f"{native}; or for the remote code: {profile_install(ctx.python, _profile('current'))}"
                         "   (transformers 4.46.3)")
        else:
            fixes.append(pip_install(ctx.python, ["transformers==4.38.2", "tokenizers==0.15.2",
                                                  "huggingface-hub==0.24.6"]) + f"   (the tutorial's stack); or: {native}")
    return "\n".join(fixes)


def _profile(name: str):
    from setup_kit.profiles import load_profile

    return load_profile(name)


@check("model.remote-code-imports", MODEL, "The remote code's imports resolve in the target environment",
       needs=("model", "imports"))
def remote_code_imports_resolve(ctx: Context) -> Result:
    if ctx.model is None:
        return skip(NO_MODEL)
    if not ctx.model.uses_remote_code:
        return skip("no remote code")
    results = ctx.imports or []
    if not results:
        return skip("the remote code imports nothing from third-party packages")
    # transformers' own names first: those are what the check is for; a missing package is simpler.
    failed = sorted((r for r in results if not r["ok"]), key=lambda r: "statement" not in r)
    transformers = ctx.env.version("transformers") if ctx.env else None
    details = [f"{'ok  ' if r['ok'] else 'FAIL'} {r.get('statement') or 'import ' + r['module']} "
               f"({r['file']})" + (f": {r['error']}" if r["error"] else "") for r in results]
    if not failed:
        return ok(f"all {len(results)} imports of the remote code resolve (transformers {transformers})", *details)
    first = failed[0]
    what = first.get("statement") or f"import {first['module']}"
    summary = f"{what} fails in {first['file']} on transformers {transformers}: {first['error']}"
    if ctx.engine == "remote-code":  # the preflight or `doctor --engine remote-code`: that engine cannot start
        return fail(summary, _imports_fix(ctx, failed), *details)
    # The kit's default engine runs the same weights without this code: only trust_remote_code needs it.
    return warn(f"{summary} (only trust_remote_code needs the remote code; the native engine, "
                "internlm-kit chat's default, does not)", _imports_fix(ctx, failed), *details)


def _rehearsal_fix(ctx: Context, rehearsal, rules) -> str:
    values = {"python": ctx.python, "model": str(ctx.model_path or "MODEL_DIR")}
    if rules:
        return "\n".join(dict.fromkeys(rule.fix.format(**values) for rule in rules))
    native = f"internlm-kit chat --engine native --model {ctx.model_path}   (runs no remote code)"
    if rehearsal.engine == "remote-code":
        return (f"No known rule explains this failure. {native}; or run the stack the kit proves: "
                f"{profile_install(ctx.python, _profile('current'))}   (transformers 4.46.3)")
    return f"No known rule explains this failure: internlm-kit doctor --model {ctx.model_path} -v, then report it."


def _rehearsal_result(ctx: Context, engine: str) -> Result:
    from setup_kit.checks.known_issues import load_rules, rules_for_exception

    if ctx.model is None:
        return skip(NO_MODEL)
    if reason := _no_folder(ctx):
        return skip(reason)
    if engine == "remote-code" and not ctx.model.uses_remote_code:
        return skip("config.json has no auto_map (no remote code to run)")
    rehearsed = (ctx.rehearsal or {}).get(engine)
    assumed = ctx.engine or "native"
    if rehearsed is None:
        why = f" ({ctx.engine_reason})" if ctx.engine_reason else ""
        return skip(f"the doctor assumed the {assumed} engine{why}; pass --engine {engine} to rehearse this one")
    said = [f"engine: {engine}" + (f" ({ctx.engine_reason})" if ctx.engine_reason else ""),
            "on a miniature twin: the folder's config.json shrunk to 2 layers x 64 wide (vocabulary, special "
            "tokens, rope kept), random weights, its own tokenizer files; no weight file read"]
    said.append("ran the folder's own remote code (trust_remote_code), as the tutorial does" if engine == "remote-code"
                else "ran no remote code (the kit's own load path)")
    if rehearsed.passed:
        steps = ("AutoTokenizer, AutoModelForCausalLM, chat, stream_chat" if engine == "remote-code"
                 else "load, chat template, one decode step")
        where = f" on transformers {rehearsed.transformers}" if rehearsed.transformers else ""
        return ok(f"{steps} ran on the twin{where} ({rehearsed.seconds:.1f}s)", *said)
    rules = rules_for_exception(load_rules(), ctx.env, ctx.model, rehearsed) if ctx.env else []
    details = said + rehearsed.details()
    for rule in rules:
        details += [f"[{rule.id}] cause: {rule.cause}"]
    if not rules:
        details.append("no known-issue rule explains this failure")
    return fail(rehearsed.summary(), _rehearsal_fix(ctx, rehearsed, rules), *details)


@check("model.rehearsal.remote-code", MODEL, "The tutorial's remote-code steps run on a miniature twin",
       needs=("model", "env", "rehearsal"))
def rehearsal_remote_code(ctx: Context) -> Result:
    return _rehearsal_result(ctx, "remote-code")


@check("model.rehearsal.native", MODEL, "The native engine loads and decodes a miniature twin",
       needs=("model", "env", "rehearsal"))
def rehearsal_native(ctx: Context) -> Result:
    return _rehearsal_result(ctx, "native")
