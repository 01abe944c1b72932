"""The gateway's API keys file: one `name key` per line, readable by its owner only."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gpufleet.errors import ConfigError, Problem
from gpufleet.paths import display_path
from gpufleet.secretfiles import secret_file_problem

MIN_KEY_LENGTH = 24
KEY_PREFIX = "sk-gf-"


@dataclass(frozen=True)
class ApiKey:
    name: str
    key: str


def read_api_keys(path: Path, key_path: str = "gateway.api_keys_file") -> list[ApiKey]:
    """Read and check the keys file; every problem names the file and line."""
    shown = display_path(path)
    found = secret_file_problem(path)
    if found is not None:
        message, fix = found
        raise ConfigError(
            [Problem(file=shown, key=key_path, message=f"the API keys file {message}",
                     fix=fix or f"create it with: gpufleet keys add {_inventory_hint(path)} <client-name>")]
        )
    keys: list[ApiKey] = []
    problems: list[Problem] = []
    names: dict[str, int] = {}
    values: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            problems.append(Problem(file=shown, line=number, key="",
                                    message="a line must be '<name> <key>' (two words)",
                                    fix="write the client name, a space, then its key"))
            continue
        name, key = parts
        if len(key) < MIN_KEY_LENGTH:
            problems.append(Problem(file=shown, line=number, key="",
                                    message=f"the key for {name!r} is {len(key)} characters; "
                                    f"at least {MIN_KEY_LENGTH} are needed",
                                    fix=f"replace it: gpufleet keys add {_inventory_hint(path)} {name} --replace"))
            continue
        if name in names:
            problems.append(Problem(file=shown, line=number, key="",
                                    message=f"client name {name!r} is used twice (first on line {names[name]})",
                                    fix=f"remove one of the two {name!r} lines, or rename one: "
                                    "every client needs its own name"))
            continue
        if key in values:
            problems.append(Problem(file=shown, line=number, key="",
                                    message=f"the key of {name!r} repeats the key on line {values[key]}",
                                    fix="give every client its own key"))
            continue
        names[name], values[key] = number, number
        keys.append(ApiKey(name, key))
    if not keys and not problems:
        problems.append(Problem(file=shown, key="", message="holds no keys, so no client could call the gateway",
                                fix=f"add one: gpufleet keys add {_inventory_hint(path)} <client-name>"))
    if problems:
        raise ConfigError(problems)
    return keys


def add_api_key(path: Path, name: str, replace: bool = False) -> str:
    """Append (or replace) a client's key, creating the file with mode 0600; returns the key."""
    if not name or any(c.isspace() for c in name):
        raise ValueError("a client name is one word without spaces")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [ln for ln in lines if not (ln.split() and ln.split()[0] == name)]
    if len(kept) != len(lines) and not replace:
        raise ValueError(f"client {name!r} already has a key; pass --replace to issue a new one")
    kept.append(f"{name} {key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(kept) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    os.chmod(path, 0o600)
    return key


def _inventory_hint(path: Path) -> str:
    # keys files normally sit in the inventory folder or its secrets/ subfolder
    parent = path.parent.parent if path.parent.name == "secrets" else path.parent
    return display_path(parent)
