"""Reading what the pyinfra CLI prints: its phases and operations as they stream, its results table.

pyinfra has no machine-readable progress output, and its results table is the one place that says
what a run changed. `make demo` shows progress from the stream; the e2e tests check that a second
run changed nothing from the table. Colours are stripped first (pyinfra colours when it can).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OPERATION = re.compile(r"^--> Starting (?:.*? )?operation: (.+)$")
_PHASES = {
    "--> Loading inventory...": "loading the inventory",
    "--> Connecting to hosts...": "connecting to the hosts",
    "--> Preparing operation": "preparing the operations (gathering facts)",
    "--> Gathering facts...": "gathering facts",
    "--> Detected changes:": "changes detected",
    "--> Beginning operation run...": "running the operations",
    "--> Results:": "done",
}
_TOTAL = re.compile(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")


def plain(line: str) -> str:
    """The line without terminal colours and surrounding blanks."""
    return _ANSI.sub("", line).strip()


@dataclass
class RunWatcher:
    """Follows a pyinfra run line by line: its phase and the operations started so far."""

    operations: int = 0
    current: str = ""
    phase: str = "starting"

    def feed(self, line: str) -> str | None:
        """Take one output line; what the run is doing now if the line changed it, else None."""
        text = plain(line)
        match = _OPERATION.match(text)
        if match:
            self.operations += 1
            self.current = match.group(1)
            return f"operation {self.operations}: {self.current}"
        for prefix, phase in _PHASES.items():
            if text.startswith(prefix):
                self.phase = phase
                return phase
        return None


def grand_total(output: str) -> dict[str, int] | None:
    """The results table's last row (hosts, changed, errors, unchanged); None when pyinfra printed no table.

    Each count is summed over the operations: "hosts" is host-operations run, "changed" those that
    ran commands (pyinfra's "Success"), then "Error" and "No change"; "-" means 0.
    """
    match = _TOTAL.search(plain_text(output))
    if match is None:
        return None
    values = [0 if cell == "-" else int(cell) for cell in match.groups()]
    return dict(zip(("hosts", "changed", "errors", "unchanged"), values, strict=True))


def changed_operations(output: str) -> list[str]:
    """Rows of the results table whose "Success" (changed) column is not empty."""
    rows = []
    for line in plain_text(output).splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 5 and cells[0] not in ("Operation", "Grand total") and cells[-3] != "-":
            rows.append(line.strip())
    return rows


def plain_text(output: str) -> str:
    return _ANSI.sub("", output)
