"""A live progress line for long runs.

On a terminal it is a rich progress bar (steps done of the budget, iteration, the key
metric, elapsed time). Elsewhere (a Ray Job's log, CI) it prints a plain line every
``interval_s`` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def format_value(value: Any) -> str:
    """Numbers for tables and status lines: whole numbers in full, others to 4 digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


class ProgressLine:
    def __init__(
        self,
        title: str,
        *,
        total: int | None,
        step_label: str,
        metrics: tuple[str, ...],
        console: Console | None = None,
        interval_s: float = 10.0,
    ):
        self.title = title
        self.total = total
        self.step_label = step_label
        self.metrics = metrics
        self.console = console or Console(stderr=True)
        self.interval_s = interval_s
        self.live = self.console.is_terminal and sys.stderr.isatty()
        self._latest: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_print = 0.0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "ProgressLine":
        self._start = time.monotonic()
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.fields[total_text]} " + self.step_label),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.title, total=self.total, total_text=f"{self.total:,}" if self.total else "?", status=""
            )
        return self

    def status_text(self) -> str:
        parts = [f"{key}={format_value(self._latest[key])}" for key in self.metrics if key in self._latest]
        return "  ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._latest.update(metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=self.status_text())
            return
        now = time.monotonic()
        if now - self._last_print >= self.interval_s:
            self._last_print = now
            self.print_line(step)

    def print_line(self, step: int) -> None:
        total = f"/{self.total:,}" if self.total else ""
        elapsed = time.monotonic() - self._start
        print(
            f"[{self.title}] {step:,}{total} {self.step_label}  {self.status_text()}  ({elapsed:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
