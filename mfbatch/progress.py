"""Feedback for long steps: a bar on a terminal, a line per tenth when not (cron logs).

Library code reports through this with the console the caller passed; no console (the
API's default, `--quiet`, `--json`) prints nothing. `log_console` makes the console the CLI
passes: off a terminal (a file, a pipe) every line it prints starts with an ISO time and
nothing is wrapped, so a log holds one greppable line per event.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console, ConsoleDimensions

if TYPE_CHECKING:  # the bar is drawn on a terminal only: logs and --quiet never import it
    from rich.progress import Progress

# Off a terminal rich would wrap at 80 columns ("obje ctiv e" in a log): lay out as if
# the line were this wide instead, which no line or table of ours reaches.
LOG_WIDTH = 10_000


def iso_now() -> str:
    """The current UTC time as ISO 8601 to the second: 2026-12-07T02:15:00Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Stamped:
    """A text stream that starts every line with `iso_now()` when it is not a terminal.

    It looks the stream up at each write (`sys.stderr` may be replaced, as tests do), and
    passes a terminal's text through untouched: a person watching sees the bar, not times.
    """

    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr
        self._line_start = True

    @property
    def target(self) -> TextIO:
        return sys.stderr if self.stderr else sys.stdout

    def isatty(self) -> bool:
        return self.target.isatty()

    def write(self, text: str) -> int:
        out = self.target
        if out.isatty():
            return out.write(text)
        stamped = []
        for piece in text.splitlines(keepends=True):
            if self._line_start:
                stamped.append(f"{iso_now()} ")
            stamped.append(piece)
            self._line_start = piece.endswith("\n")
        return out.write("".join(stamped))

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class LogConsole(Console):
    """A rich console that never wraps off a terminal (files and pipes get LOG_WIDTH)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        return size if self.is_terminal else ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def log_console(*, stderr: bool = True, stamped: bool = True, markup: bool = True) -> Console:
    """The CLI's console: on stderr, each line stamped with its time off a terminal; on
    stdout (the command's result: tables, the summary) unwrapped but unstamped."""
    if stamped:
        stamped_file: Any = _Stamped(stderr)  # a text stream that stamps each line
        return LogConsole(file=stamped_file, soft_wrap=True, markup=markup)
    return LogConsole(stderr=stderr, soft_wrap=True, markup=markup)


class Steps:
    """Count `total` units of work named `unit`; a line at each 10% when not on a terminal."""

    def __init__(self, console: Console | None, label: str, total: int, unit: str) -> None:
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.done = 0
        self.started = time.perf_counter()
        self._next_line = 0.1
        self._bar: Progress | None = None
        if console is not None and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn(label, markup=False, style="bold"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn(unit, markup=False),
                console=console,
                transient=True,
            )
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> Steps:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, value, traceback)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        if self.console is None or self.total <= 0:
            return
        share = self.done / self.total
        if share + 1e-12 >= self._next_line or self.done >= self.total:
            while self._next_line <= share + 1e-12:
                self._next_line += 0.1
            seconds = time.perf_counter() - self.started
            rate = self.done / seconds if seconds > 0 else 0.0
            self.console.print(
                f"{self.label}: {share:4.0%} ({self.done:,}/{self.total:,} {self.unit}), "
                f"{rate:,.0f} {self.unit}/s, {seconds:.1f} s",
                highlight=False,
                soft_wrap=True,
            )


def log_step(console: Console | None, label: str, text: str, started: float) -> None:
    """One line per step of a short stage, only off a terminal (a bar shows it on one)."""
    if console is not None and not console.is_terminal:
        seconds = time.perf_counter() - started
        console.print(f"{label}: {text} ({seconds:.1f} s)", highlight=False, soft_wrap=True)
