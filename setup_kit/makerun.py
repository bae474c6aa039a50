"""Run a kit command from a Makefile recipe so that it ends as the kit ends.

The terminal sends Ctrl-C to its whole foreground process group, make included: a Ctrl-C that
stops a chat reply would also make make give up, and after a clean `/exit` the user would read
`make: *** [Makefile:NN: chat] Interrupt`. Here the kit runs in its own process group, made the
terminal's foreground group, so Ctrl-C reaches the kit alone; when it ends the terminal goes back
to make's group and this process exits with the kit's status.

Usage (from the Makefile): python -m setup_kit.makerun internlm-kit chat --model DIR
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def _terminal() -> int | None:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def run(argv: list[str]) -> int:
    tty = _terminal()
    if tty is None:  # no terminal of ours (piped, CI): nothing to take, just be the kit
        os.execvp(argv[0], argv)

    def take_terminal() -> None:  # in the child, before exec
        os.setpgid(0, 0)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.tcsetpgrp(tty, os.getpgrp())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)

    # Not in the foreground group any more, this process must not stop when it takes the terminal back.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(argv, preexec_fn=take_terminal, pass_fds=(tty,))
    except FileNotFoundError:
        print(f"{argv[0]}: not found", file=sys.stderr)
        return 127
    try:
        status = child.wait()
    finally:
        try:
            os.tcsetpgrp(tty, os.getpgrp())
        except OSError:
            pass
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
