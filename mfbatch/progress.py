"""Feedback for long steps: a bar on a terminal, a line per tenth when not (cron logs).

Library code reports through this with the console the caller passed; no console (the
API's default, `--quiet`, `--json`) prints nothing.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Steps:
    """Count `total` units of work named `unit`; a line at each 10% when not on a terminal."""

    def __init__(self, console: Console | None, label: str, total: int, unit: str) -> None:
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.done = 0
        self.started = time.perf_counter()
        self._next_line = 0.1
        self._bar: Progress | None = None
        if console is not None and console.is_terminal:
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
