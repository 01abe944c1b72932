"""What an inventory holds once read: groups, hosts and each host's merged variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class Origin:
    """Where a value was written: a file (as shown to the user) and its line."""

    file: str
    line: int | None = None


@dataclass
class Group:
    name: str
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    depth: int = 0
    # `vars:` blocks written for this group in hosts.yml (a group may be written in several places)
    inline_vars: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class InventoryHost:
    """A host with its variables merged from role defaults, groups and host_vars.

    `origins` maps each key path to the file and line that set it last, so an invalid value is
    reported where the user wrote it rather than where it ended up.
    """

    name: str
    groups: list[str]
    vars: dict[str, Any]
    origins: dict[KeyPath, Origin]
    defined_at: Origin

    def origin_of(self, path: KeyPath) -> Origin | None:
        """The origin of `path`, or of its nearest parent that has one."""
        for end in range(len(path), 0, -1):
            origin = self.origins.get(path[:end])
            if origin is not None:
                return origin
        return None


@dataclass
class Inventory:
    root: Path
    hosts_file: str
    groups: dict[str, Group]
    hosts: dict[str, InventoryHost]

    def hosts_in(self, group: str) -> list[InventoryHost]:
        return [h for h in self.hosts.values() if group in h.groups]
