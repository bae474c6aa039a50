"""The rehearsal, seen from the doctor: run `rehearse_script.py` in the target interpreter, read its answer.

Interface (also used by `doctor --fix` to prove a fix):

    rehearse(python, folder, engine, dtype="auto", device_map="auto", timeout=120.0, imports=None)
        -> RehearsalResult

`engine` is "remote-code" (the folder's own code through trust_remote_code, as the tutorial calls it:
AutoTokenizer, AutoModelForCausalLM with the dtype and device_map given, `chat`, then `stream_chat`
consumed by the tutorial's loop) or "native" (the kit's own load path and one decode step; needs the kit
importable in `python`). Both run on a miniature twin of the folder (its config shrunk, random weights,
its own tokenizer files; no weight file read) and check the chat tokens' ids against the vocabulary.

RehearsalResult fields: passed (bool), stage (where it stopped: "AutoTokenizer.from_pretrained",
"AutoModelForCausalLM.from_pretrained", "chat", "stream_chat", "chat tokens", "native load", "timeout",
"crashed", ...), exception_type, message, where ("modeling_internlm2.py:123 in prepare_inputs_for_generation":
the innermost frame in the remote code, else the innermost frame), code (that frame's source line),
token_problem (the chat tokens' ids past the vocabulary, or None), note (e.g. "a hang"), transformers
(its version there), seconds, imports (the probe items' outcomes when `imports` were given), raw (the
answer's JSON). `summary()` is one line for a report. Never raises for what the target does: a hang is a
result with stage "timeout", a crash one with stage "crashed".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from setup_kit.probe import _tail, describe_exit, finish, start_script

ENGINES = ("remote-code", "native")


@dataclass
class RehearsalResult:
    engine: str
    passed: bool
    stage: str = ""
    exception_type: str = ""
    message: str = ""
    where: str = ""
    code: str = ""
    token_problem: str | None = None
    note: str = ""
    transformers: str = ""
    seconds: float = 0.0
    imports: list[dict] | None = None
    raw: dict = field(default_factory=dict)

    @property
    def exception(self) -> str:
        """'Type: message' of the real exception, '' when there was none."""
        return f"{self.exception_type}: {self.message}" if self.exception_type else ""

    def summary(self) -> str:
        if self.passed:
            return f"the {self.engine} rehearsal ran on the twin ({self.seconds:.1f}s)"
        if self.exception_type:
            at = f" at {self.where}" if self.where else ""
            return f"{self.stage} fails: {self.exception}{at}"
        return f"{self.stage} fails: {self.token_problem or self.note or self.message}"

    def details(self) -> list[str]:
        lines = [f"stage: {self.stage}"] if self.stage else []
        if self.exception_type:
            lines.append(f"exception: {self.exception}")
        if self.where:
            lines.append(f"at {self.where}" + (f": {self.code}" if self.code else ""))
        if self.note:
            lines.append(self.note)
        if self.token_problem:
            lines.append(self.token_problem)
        frames = (self.raw.get("exception") or {}).get("frames") or []
        if frames:
            lines.append("traceback (innermost last): " + " > ".join(frames))
        return lines


def start(python: str, folder, engine: str, dtype: str = "auto", device_map: str | None = "auto",
          timeout: float = 120.0, imports: list[dict] | None = None):
    """Start the rehearsal; pass what this returns to `result` (lets the doctor run it beside other probes)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    request = {"mode": engine, "folder": str(folder), "dtype": dtype, "device_map": device_map,
               "imports": imports or [], "timeout": max(5.0, timeout / 3)}
    process = start_script(python, "rehearse_script.py", stdin=True)
    try:  # the request goes now, so the rehearsal works while the caller waits on other probes
        process.stdin.write(json.dumps(request))
        process.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # it died at start: result() reports how
    process.stdin = None
    return process, request, engine, timeout, time.perf_counter()


def result(started) -> RehearsalResult:
    process, request, engine, timeout, began = started
    status, out, err = finish(process, max(1.0, timeout - (time.perf_counter() - began)))
    seconds = time.perf_counter() - began
    if status == "timeout":
        return RehearsalResult(engine, False, "timeout", message=f"the rehearsal did not finish within "
                               f"{timeout:.0f}s (killed); last output: {_tail(err, 3) or '(none)'}", seconds=seconds)
    try:
        data = json.loads(out)
    except ValueError:
        return RehearsalResult(engine, False, "crashed", message=f"the rehearsal {describe_exit(process.returncode)}: "
                               f"{_tail(err, 4) or '(no output)'}", seconds=seconds)
    exc = data.get("exception") or {}
    return RehearsalResult(engine, bool(data.get("passed")), data.get("stage", ""), exc.get("type", ""),
                           exc.get("message", ""), exc.get("where", ""), exc.get("code", ""),
                           data.get("token_problem"), data.get("note", ""), data.get("transformers", ""),
                           seconds, data.get("imports"), data)


def rehearse(python: str, folder, engine: str, dtype: str = "auto", device_map: str | None = "auto",
             timeout: float = 120.0, imports: list[dict] | None = None) -> RehearsalResult:
    """Rehearse `engine` on a twin of `folder` in the interpreter `python` (see the module docstring)."""
    return result(start(python, folder, engine, dtype, device_map, timeout, imports))
