"""Errors a user can cause. The CLI turns them into one paragraph and an exit code."""

from __future__ import annotations


class KitError(Exception):
    """A problem the user can fix: what went wrong, and what to do next.

    ``exit_code`` follows the kit's convention: 1 for "the operation failed",
    2 for "bad arguments / the tool could not run at all".
    """

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} {self.fix}"


class UsageError(KitError):
    """Bad arguments: the command could not start."""

    exit_code = 2


class ModelFolderError(KitError):
    """A model folder that is missing, incomplete or not something the kit understands."""


class ChatError(KitError):
    """An error whose advice depends on where the user is: `fix` names the command-line options
    (piped input, `--prompt`), `chat_fix` the slash commands of the interactive chat."""

    def __init__(self, message: str, fix: str, chat_fix: str):
        super().__init__(message, fix)
        self.chat_fix = chat_fix


class ContextOverflow(KitError):
    """An engine's server refused the prompt as too long for its context window.

    Only the server knows its tokenizer (our count for it is an estimate), so the session takes
    this as the word that settles it: it drops the oldest exchange and asks again.
    """
