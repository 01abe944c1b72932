"""Configuration errors that name the file, the key path, what is wrong and how to fix it.

Every way a value enters gpufleet (YAML files, the schema, the planner) reports problems as
`Problem` records collected into one `ConfigError`, so a user sees all of them at once and the
CLI can print them without a traceback and exit with code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

EXIT_CONFIG_ERROR = 2

_NO_VALUE = object()


def show_value(value: Any) -> str:
    """Render a user's value the way they wrote it in YAML, kept short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping {" + ", ".join(str(k) for k in list(value)[:4]) + ("…}" if len(value) > 4 else "}")
    elif isinstance(value, list):
        text = f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration.

    `file`/`line` say where the offending value was written (for a merged value: the file that
    set it last), `key` is the dotted key path inside the host's variables, `message` says what
    is wrong and `fix` what to do about it.
    """

    file: str | None
    key: str
    message: str
    fix: str
    line: int | None = None
    value: Any = field(default=_NO_VALUE, compare=False)
    host: str | None = None

    def location(self) -> str:
        if self.file is None:
            return "<inventory>"
        return f"{self.file}:{self.line}" if self.line else self.file

    def render(self) -> str:
        head = self.location()
        if self.host:
            head += f" (host{'s' if ', ' in self.host else ''} {self.host})"
        if self.key:
            head += f": {self.key}"
        return f"{head}: {self.message}\n  fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "file": self.file,
            "line": self.line,
            "key": self.key,
            "host": self.host,
            "message": self.message,
            "fix": self.fix,
        }
        if self.value is not _NO_VALUE:
            data["value"] = self.value
        return data


class ConfigError(Exception):
    """One or more configuration problems; nothing was changed."""

    def __init__(self, problems: list[Problem]):
        if not problems:
            raise ValueError("ConfigError needs at least one problem")
        self.problems = _dedupe(problems)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"error: {p.render()}" for p in self.problems)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """Report a value shared by many hosts (a group_vars setting) once, naming every host it fails on."""
    order: list[tuple[Any, ...]] = []
    grouped: dict[tuple[Any, ...], list[Problem]] = {}
    for problem in problems:
        ident = (problem.file, problem.line, problem.key, problem.message)
        if ident not in grouped:
            order.append(ident)
            grouped[ident] = []
        grouped[ident].append(problem)
    unique: list[Problem] = []
    for ident in order:
        first, *rest = grouped[ident]
        hosts = [p.host for p in (first, *rest) if p.host]
        if len(hosts) > 1:
            first = replace(first, host=", ".join(dict.fromkeys(hosts)))
        unique.append(first)
    return unique
