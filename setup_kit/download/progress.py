"""One rich progress display for a whole download: bytes, speed and time left, on stderr."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class DownloadProgress:
    """A total bar plus one line per file in flight. Thread-safe; silent when ``enabled`` is False."""

    def __init__(self, console: Console, total: int, enabled: bool = True, to_check: int = 0):
        self.enabled = enabled and (total > 0 or to_check > 0)
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not self.enabled,
            refresh_per_second=5,
        )
        self._total = self._progress.add_task("download", total=total, visible=total > 0)
        self._check = self._progress.add_task("verify files already here", total=to_check, visible=to_check > 0)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def file(self, name: str, size: int, done: int = 0):
        """A callback for one file's bytes (negative to roll back refetched bytes)."""
        task = self._progress.add_task(f"  {escape(name)}", total=size, completed=done, visible=self.enabled)

        def advance(n: int) -> None:
            self._progress.advance(task, n)
            self._progress.advance(self._total, n)

        advance.finish = lambda: self._progress.remove_task(task)  # type: ignore[attr-defined]
        return advance

    def checked(self, n: int) -> None:
        """Bytes of files already on disk hashed against the hub's metadata."""
        self._progress.advance(self._check, n)

    def add_total(self, n: int) -> None:
        """A file on disk failed its check and has to travel after all."""
        task = next(t for t in self._progress.tasks if t.id == self._total)
        self._progress.update(self._total, total=(task.total or 0) + n, visible=True)
