"""The terminal around a `Session`: prompt, streaming output, slash commands, Ctrl-C.

Three ways in, one loop underneath:
- a terminal on stdin: line editing and input history (stdlib `readline`), `/commands`, multi-line
  input between `\"\"\"` lines, Ctrl-C stops a reply and returns to the prompt;
- anything else on stdin (a pipe, a file): each line is one user turn, stdout gets only the replies
  (banner, notices and errors go to stderr), so `echo hi | internlm-kit chat > reply.txt` works;
- `--prompt TEXT`: one turn, then exit.
`--json` replaces the streamed text with one JSON object per turn on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape

from setup_kit.errors import ChatError, KitError
from setup_kit.session import Session, TurnResult

MULTILINE = '"""'
EXIT_WORDS = {"exit", "/exit", "/bye", "/quit"}
PROMPT = ">>> "
CONTINUATION = "... "

HELP = [
    ("/help", "show this list"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/system TEXT", "set the system prompt (no TEXT: show it)"),
    ("/set NAME VALUE", "temperature, top_p, max_new_tokens or seed; /set alone shows them"),
    ("/save FILE", "save the conversation as JSON"),
    ("/load FILE", "load a conversation saved with /save"),
    ("/stats", "tokens, time to first token and tokens/s of the last reply"),
    ('"""', "start and end multi-line input"),
    ("/exit", "end the session (also exit, Ctrl-D, or Ctrl-C at an empty prompt)"),
]


@dataclass
class Terminal:
    """Where things go. `out` gets replies only; `err` (a rich console) gets everything else."""

    out: TextIO
    err: Console
    json: bool = False
    interactive: bool = False  # slash commands work here, so advice may name them

    def text(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()

    def note(self, message: str, style: str = "dim") -> None:
        self.err.print(escape(message), style=style or None, highlight=False)

    def error(self, exc: KitError) -> None:
        fix = exc.chat_fix if self.interactive and isinstance(exc, ChatError) else exc.fix
        text = exc.message + (f"\n  fix: {fix}" if fix else "")
        self.err.print(f"[bold red]error:[/bold red] {escape(text)}", highlight=False)


class Repl:
    def __init__(self, session: Session, terminal: Terminal, *,
                 history_file: Path | None = None):
        self.session = session
        self.term = terminal
        self.history_file = history_file

    # -- one turn ---------------------------------------------------------------------------

    def turn(self, text: str) -> TurnResult:
        """Send one user message and show the reply as it streams. Ctrl-C stops just this reply."""
        cancel = threading.Event()
        streamed = not self.term.json
        with _sigint_sets(cancel):
            try:
                result = self.session.send(text, cancel=cancel,
                                           on_text=self.term.text if streamed else None)
            except KitError as exc:  # nothing was sent (e.g. no room in the context window)
                self.term.error(exc)
                raise
        calls = list(getattr(self.session.engine, "last_tool_calls", None) or [])
        if streamed:
            self.term.text("\n")
            for call in calls:  # a server that parses tool calls sends them apart from the text
                self.term.text(f"tool call: {call['name']}({call['arguments']})\n")
        if calls:
            self.term.note("(the model asked for a tool call; chat runs no tools: send the result as your "
                           "next message to go on)")
        if result.dropped:
            self.term.note(f"(dropped the {result.dropped} oldest messages of the conversation "
                           f"to fit the {self.session.engine.context_window}-token context window)",
                           "yellow")
        if result.stats.stop == "interrupt" and result.error is None:
            self.term.note("(reply stopped; what was said is kept in the conversation)"
                           if result.reply else "(reply stopped before it began)")
        elif result.stats.stop == "length":
            more = "/set max_new_tokens N, /reset" if self.term.interactive else "--max-new-tokens N"
            self.term.note(f"(reply cut at its length limit, {result.stats.completion_tokens} "
                           f"tokens: max_new_tokens or the room left in the context window; {more})")
        if result.error is not None:
            self.term.error(result.error)
        if self.term.json:
            turn = result.to_json()
            if calls:
                turn["tool_calls"] = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
            self.term.text(json.dumps(turn, ensure_ascii=False) + "\n")
        return result

    # -- the interactive loop ---------------------------------------------------------------

    def interactive(self) -> int:
        self.term.interactive = True
        readline = _setup_readline(self.history_file)
        self.term.note('Type a message; /help for commands, """ for multi-line input, '
                       "Ctrl-C stops a reply, Ctrl-D or /exit ends the session.")
        try:
            while True:
                try:
                    text = self._read_message()
                except EOFError:
                    self.term.err.print()
                    return 0
                except KeyboardInterrupt:
                    self.term.err.print()
                    if _line_buffer(readline):
                        continue  # Ctrl-C on a half-typed line throws the line away
                    return 0
                if text is None:
                    continue
                if text.strip() in EXIT_WORDS:
                    return 0
                if text.startswith("/") and not text.startswith("//"):
                    self.command(text)
                    continue
                try:
                    self.turn(text[1:] if text.startswith("//") else text)
                except KitError:
                    continue
        finally:
            _save_history(readline, self.history_file)

    def _read_message(self) -> str | None:
        line = input(PROMPT)
        if not line.strip():
            return None
        if not line.lstrip().startswith(MULTILINE):
            return line
        first = line.lstrip()[len(MULTILINE):]
        if first.rstrip().endswith(MULTILINE) and first.strip():
            return first.rstrip()[: -len(MULTILINE)]
        lines = [first] if first else []
        while True:
            line = input(CONTINUATION)
            if line.rstrip().endswith(MULTILINE):
                last = line.rstrip()[: -len(MULTILINE)]
                if last:
                    lines.append(last)
                return "\n".join(lines) or None
            lines.append(line)

    def piped(self, lines) -> int:
        """Each line of a non-terminal stdin is one user turn. Exit 1 if any turn failed."""
        status = 0
        for raw in lines:
            text = raw.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                result = self.turn(text)
            except KitError as exc:
                return exc.exit_code
            if result.error is not None:
                status = result.error.exit_code
        return status

    def once(self, text: str) -> int:
        """`--prompt TEXT`: one turn, then exit (1 if the engine failed)."""
        try:
            result = self.turn(text)
        except KitError as exc:
            return exc.exit_code
        if result.error is not None:
            return result.error.exit_code
        return 130 if result.stats.stop == "interrupt" else 0

    # -- slash commands ---------------------------------------------------------------------

    def command(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        handler: Callable[[str], None] | None = COMMANDS.get(name.lower())
        if handler is None:
            self.term.note(f"Unknown command {name}. /help lists the commands; start a line "
                           "with // to send a message that begins with /.", "yellow")
            return
        try:
            handler(self, arg.strip())
        except KitError as exc:
            self.term.error(exc)

    def cmd_help(self, arg: str) -> None:
        for usage, what in HELP:
            self.term.err.print(f"  [bold]{escape(usage):<16}[/bold] {escape(what)}",
                                highlight=False)

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.term.note("(conversation cleared)")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.term.note(f"system prompt: {self.session.system or '(none)'}", "")
            return
        self.session.system = arg
        self.term.note("(system prompt set; it applies from the next reply)")

    def cmd_set(self, arg: str) -> None:
        parts = arg.split()
        if len(parts) != 2:
            p = self.session.params
            self.term.note(f"temperature {p.temperature}  top_p {p.top_p}  max_new_tokens "
                           f"{p.max_new_tokens}  seed {p.seed}  greedy {p.greedy}  "
                           "(change one with /set NAME VALUE)", "")
            return
        value = self.session.set(parts[0], parts[1])
        self.term.note(f"({parts[0]} = {value})")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise KitError("/save needs a file name.", fix="For example: /save chat.json")
        path = self.session.save(arg)
        self.term.note(f"(saved {len(self.session.history)} messages to {path})")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise KitError("/load needs a file name.", fix="For example: /load chat.json")
        self.session.load(arg)
        self.term.note(f"(loaded {len(self.session.history)} messages from {arg})")

    def cmd_stats(self, arg: str) -> None:
        last = self.session.last
        context = self.session.context_tokens()
        window = self.session.engine.context_window
        lines = [f"engine: {self.session.engine.describe()}",
                 f"conversation: {len(self.session.history)} messages, {context} of {window} "
                 "context tokens"]
        if last is None:
            lines.append("no reply yet")
        else:
            s = last.stats
            lines.append(f"last reply: prompt {s.prompt_tokens} tokens, reply "
                         f"{s.completion_tokens} tokens, first token {s.first_token_seconds:.3f} s, "
                         f"{s.tokens_per_second:.1f} tokens/s, {s.seconds:.2f} s in all, "
                         f"stop: {s.stop}")
        for line in lines:
            self.term.note(line, "")


COMMANDS = {
    "/help": Repl.cmd_help, "/?": Repl.cmd_help,
    "/reset": Repl.cmd_reset, "/clear": Repl.cmd_reset,
    "/system": Repl.cmd_system,
    "/set": Repl.cmd_set,
    "/save": Repl.cmd_save,
    "/load": Repl.cmd_load,
    "/stats": Repl.cmd_stats,
}


class _sigint_sets:
    """While a reply streams, the first Ctrl-C sets `cancel` (the engine stops at its next
    token and the partial reply is kept); a second one raises KeyboardInterrupt as usual."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.previous = None
        self.tty = None  # (fd, attributes before) while NOFLSH is set

    def _handler(self, signum, frame):
        if self.cancel.is_set():
            raise KeyboardInterrupt
        self.cancel.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
            self.tty = _set_noflsh()
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.tty is not None:
            _restore_tty(*self.tty)
        return False


def _set_noflsh():
    """NOFLSH on the terminal while a reply streams: without it the terminal driver discards output
    still in transit when Ctrl-C arrives, so the reply's last piece could be kept in the conversation
    without ever reaching the screen (seen once in the REPL test under load). (fd, old attributes),
    or None where stdin is no terminal."""
    try:
        import termios
    except ImportError:  # not POSIX
        return None
    try:
        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return None
        before = termios.tcgetattr(fd)
        after = list(before)
        after[3] |= termios.NOFLSH
        termios.tcsetattr(fd, termios.TCSANOW, after)
        return fd, before
    except (OSError, ValueError, AttributeError, termios.error):
        return None


def _restore_tty(fd: int, attributes) -> None:
    import termios

    try:
        termios.tcsetattr(fd, termios.TCSANOW, attributes)
    except (OSError, termios.error):
        pass


def _setup_readline(history_file: Path | None):
    try:
        import readline
    except ImportError:  # pragma: no cover - e.g. Windows without pyreadline
        return None
    if history_file is not None:
        try:
            readline.read_history_file(str(history_file))
        except OSError:
            pass
        readline.set_history_length(1000)
    return readline


def _line_buffer(readline) -> str:
    try:
        return readline.get_line_buffer() if readline is not None else ""
    except Exception:  # noqa: BLE001 - some readline builds lack it
        return ""


def _save_history(readline, history_file: Path | None) -> None:
    if readline is None or history_file is None:
        return
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(str(history_file))
    except OSError:
        pass


def run(session: Session, *, prompt: str | None = None, as_json: bool = False,
        stdin: TextIO | None = None, stdout: TextIO | None = None,
        history_file: Path | None = None, banner: str | None = None) -> int:
    """Chat on the given session; returns the exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    repl = Repl(session, Terminal(stdout, err, as_json), history_file=history_file)
    if banner:
        err.print(banner, highlight=False)
    if prompt is not None:
        return repl.once(prompt)
    if stdin.isatty() and not as_json:
        return repl.interactive()
    return repl.piped(stdin)


# -- `internlm-kit chat`: pre-flight, engine, session, loop ------------------------------------


@dataclass
class ChatRequest:
    """Everything `internlm-kit chat` was asked for on its command line."""

    model: str | None = None
    engine: str = "native"
    endpoint: str | None = None
    api_key: str | None = None
    system: str | None = None
    max_new_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 0.8
    greedy: bool = False
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    prompt: str | None = None
    as_json: bool = False
    skip_checks: bool = False
    compile: bool = False


def run_chat(request: ChatRequest) -> int:
    """Check, load, chat. Raises KitError for anything the user can fix; returns the exit code."""
    from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT, EngineOptions, GenerationParams
    from setup_kit.engines.select import ENGINES, create_engine, missing_model_error, \
        resolve_model_dir
    from setup_kit.errors import UsageError
    from setup_kit.locations import state_dir

    engine_name = "openai" if request.endpoint and request.engine == "native" else request.engine
    if engine_name not in ENGINES:
        raise UsageError(f"Unknown engine {request.engine!r}.",
                         fix=f"Use one of: {', '.join(ENGINES)}.")
    if request.device not in ("auto", "cpu", "cuda") and not request.device.startswith("cuda:"):
        raise UsageError(f"Unknown device {request.device!r}.", fix="Use auto, cpu or cuda.")
    if request.dtype not in ("auto", "bf16", "fp16", "fp32", "int8", "int4"):
        raise UsageError(f"Unknown dtype {request.dtype!r}.", fix="Use auto, bf16, fp16, fp32, int8 or int4.")
    model_dir = None
    if engine_name != "openai":
        model_dir = resolve_model_dir(request.model)
        if not model_dir.is_dir():
            raise missing_model_error(request.model, model_dir)
    if not request.skip_checks:
        preflight(engine_name, model_dir, request.device, request.dtype)

    options = EngineOptions(model=str(model_dir) if model_dir else request.model,
                            device=request.device, dtype=request.dtype,
                            endpoint=request.endpoint, api_key=request.api_key,
                            compile=request.compile)
    engine = create_engine(engine_name, options)
    try:
        params = GenerationParams(max_new_tokens=request.max_new_tokens,
                                  temperature=request.temperature, top_p=request.top_p,
                                  greedy=request.greedy, seed=request.seed)
        system = request.system if request.system is not None else DEFAULT_SYSTEM_PROMPT
        session = Session(engine, system=system or None, params=params)
        return run(session, prompt=request.prompt, as_json=request.as_json,
                   history_file=state_dir() / "chat_history",
                   banner=f"[bold]internlm-kit chat[/bold]: {escape(engine.describe())}")
    finally:
        engine.close()


def preflight(engine: str, model_dir: Path | None, device: str, dtype: str) -> None:
    """The doctor's checks for this engine; on a failure show them and stop (exit 1)."""
    from setup_kit import doctor, report

    result = doctor.preflight(engine, model_dir, device, dtype)
    if result.ok:
        return
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    report.render(result, console)
    target = f" --model {model_dir}" if model_dir else ""
    raise KitError("The pre-flight checks above failed, so the chat did not start.",
                   fix=f"Follow the fix shown for each failed check; `internlm-kit doctor{target}` "
                       "shows the full report. --skip-checks starts anyway.")
