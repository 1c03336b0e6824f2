"""Errors the CLI turns into exit codes: bad input exits 2, a failed run exits 1."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located by a dotted field path."""

    path: str
    message: str
    line: int | None = None

    def render(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '<top level>'}: {self.message}"


class BadInput(Exception):
    """Input refused before any work started (exit code 2)."""


@dataclass
class SpecError(BadInput):
    """A spec that failed validation; names the file and every bad field."""

    source: str
    problems: list[Problem] = field(default_factory=list)
    what: str = "spec"

    def __str__(self) -> str:
        lines = [f"invalid {self.what} {self.source}:"]
        lines += [f"  - {problem.render()}" for problem in self.problems]
        return "\n".join(lines)


class RunFailed(Exception):
    """A run, trial or job that started and then failed (exit code 1)."""
