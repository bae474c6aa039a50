"""The `remote-code` engine: the tutorial's path, `trust_remote_code=True`, the model's own
modeling_internlm2.py run by the installed transformers.

It is offered only where that code can import: the doctor's remote-code import check (which
tries each import the remote code makes, in a subprocess) must pass first, because the current
remote code stops importing on newer transformers (`transformers.modeling_attn_mask_utils` is gone
in 5.24, `DynamicCache.get_max_length` in 4.49). Where it cannot, the user is told so and pointed
at the native engine, which runs the same weights with no remote code.

Generation is the native engine's decode loop (incremental detokenization, Ctrl-C, statistics), not
the remote code's `stream_chat`, which decodes one token at a time and breaks split characters.
"""

from __future__ import annotations

from pathlib import Path

from setup_kit.engines.native import (LoadInfo, NativeEngine, choose_device_dtype, eos_token_ids,
                                      torch_dtype_for)
from setup_kit.errors import KitError, ModelFolderError

IMPORT_CHECK = "model.remote-code-imports"


def check_remote_code_imports(model_dir: Path) -> None:
    """Raise a clear KitError unless the doctor's remote-code import check passes here."""
    from setup_kit import doctor

    report = doctor.diagnose(model=str(model_dir), only=[IMPORT_CHECK], engine="remote-code")
    result = next((c for c in report.checks if c.id == IMPORT_CHECK), None)
    if result is None or result.status in ("ok", "skip", "warn"):
        return
    details = f": {result.summary}" if result.summary else ""
    raise KitError(
        f"The model's remote code cannot run with the transformers installed here{details}. "
        "The remote-code engine is only offered where the doctor's import check passes.",
        fix=result.fix or f"Chat without remote code: internlm-kit chat --engine native "
                          f"--model {model_dir}")


def load_remote_code_model(model_dir: Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, LoadInfo) through `trust_remote_code=True`."""
    import time

    from setup_kit.modelfolder import open_model_folder

    started = time.perf_counter()
    folder = open_model_folder(model_dir)
    if not folder.uses_remote_code:
        raise ModelFolderError(f"{folder.path} has no remote code (config.json has no auto_map).",
                               fix=f"Use the native engine: internlm-kit chat --model {folder.path}")
    device, dtype, reason, gpu = choose_device_dtype(device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = torch_dtype_for(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder.path), trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder.path), trust_remote_code=True,
                                                     torch_dtype=torch_dtype)
    except Exception as exc:  # the model's own code: it may raise anything (protobuf's VersionError)
        raise KitError(f"The model's remote code failed to load: {type(exc).__name__}: {exc}",
                       fix=f"`internlm-kit doctor --model {folder.path}` names the cause; or chat "
                           f"without remote code: internlm-kit chat --engine native --model "
                           f"{folder.path}") from None
    _check_chat_tokens(tokenizer, model, folder.path)
    model = model.to(device).eval()
    info = LoadInfo(model_dir=folder.path, layout="remote-code", device=device, dtype=dtype,
                    reason=reason, parameters=sum(p.numel() for p in model.parameters()),
                    load_seconds=time.perf_counter() - started,
                    context_window=int(getattr(model.config, "max_position_embeddings", 2048)),
                    eos_token_ids=eos_token_ids(model, tokenizer), gpu_name=gpu)
    return model, tokenizer, info


def _check_chat_tokens(tokenizer, model, path: Path) -> None:
    """The model's own tokenizer must give the chat tokens ids the model has rows for: on
    transformers 5.x it gives them new ids past the vocabulary, and the first reply would die with
    an IndexError deep in the model (the doctor's rehearsal finds the same)."""
    import sys

    from setup_kit.checks.known_issues import load_rules
    from setup_kit.probe.rehearse_script import check_chat_tokens

    problem, _ = check_chat_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
    if not problem:
        return
    rule = next((r for r in load_rules() if r.id == "remote-tokenizer-new-chat-token-ids"), None)
    native = f"internlm-kit chat --engine native --model {path}"
    raise KitError(f"The model's own tokenizer does not fit the model on this transformers: {problem}."
                   + (f" {rule.cause}" if rule else ""),
                   fix=rule.fix.format(python=sys.executable, model=path) if rule else native)


class RemoteCodeEngine(NativeEngine):
    """The remote code's model class, driven by the native engine's decode loop."""

    name = "remote-code"

    def __init__(self, model_dir, device: str = "auto", dtype: str = "auto", *,
                 check_imports: bool = True):
        model_dir = Path(model_dir)
        if check_imports:
            check_remote_code_imports(model_dir)
        model, tokenizer, info = load_remote_code_model(model_dir, device, dtype)
        super().__init__(model_dir, model=model, tokenizer=tokenizer, info=info)

    def describe(self) -> str:
        return super().describe().replace("native engine", "remote-code engine (trust_remote_code)")

    def _forward(self, inputs, cache, position):
        # The remote code's forward takes the legacy arguments only (no cache_position).
        out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :], out.past_key_values
