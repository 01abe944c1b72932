"""Secret files: the gateway's API keys and the engines' Hugging Face token.

A secret lives in a regular file that only its owner can read or write (mode 0600), never in the
repository (inventories' `secrets/` folder is git-ignored), process arguments or logs.
`secret_file_problem` is the check both files get before any host is contacted;
`read_hf_token` adds what a token file must hold. No message ever quotes a secret.
"""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.errors import Problem
from gpufleet.paths import display_path

if TYPE_CHECKING:
    from gpufleet.fleet import FleetHost

HF_TOKEN_KEY = "engine.hf_token_file"


def secret_file_problem(path: Path) -> tuple[str, str | None] | None:
    """None when `path` is a regular file only its owner may access; else (what is wrong, fix).

    What is wrong reads after the file's name ("does not exist"); the fix is None where only the
    caller knows it (how to create the file).
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return "does not exist", None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", "check the path and its folders' permissions"
    if not stat.S_ISREG(info.st_mode):
        return "is not a file", None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return f"is readable by others (mode {mode:04o})", f"chmod 600 {display_path(path)}"
    return None


def read_hf_token(path: Path) -> str | tuple[str, str]:
    """The token a 0600 file at `path` holds alone on one line; else (what is wrong, fix).

    One line because the engines read the whole file: huggingface_hub joins the lines into one
    token, the hf-hub crate (TGI) keeps the line break inside it.
    """
    shown = display_path(path)
    # read -s and the printf builtin keep the token off the screen, the shell history and `ps`
    write = (
        f"write the token alone on one line: run (umask 077; read -rs t; printf '%s\\n' \"$t\" > {shown}) and paste it"
    )
    found = secret_file_problem(path)
    if found is not None:
        message, fix = found
        return message, fix or write
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text", write
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", f"make it readable by the user running gpufleet: {write}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "is empty", write
    if len(lines) > 1:
        return f"holds {len(lines)} lines; a token file holds the token alone on one line", write
    if any(char.isspace() for char in lines[0]):
        return "holds a line with spaces; a token has none", write
    return lines[0]


def with_hf_tokens(root: Path, hosts: list[FleetHost], problems: list[Problem]) -> list[FleetHost]:
    """The hosts, GPU hosts with `engine.hf_token_file` carrying its token (each file read once).

    A file that cannot serve is a problem naming where `engine.hf_token_file` was set.
    """
    read: dict[Path, str | tuple[str, str]] = {}
    loaded: list[FleetHost] = []
    for host in hosts:
        engine = host.config.engine
        if not host.in_group("gpu") or engine is None or engine.hf_token_file is None:
            loaded.append(host)
            continue
        path = (root / engine.hf_token_file).resolve()
        if path not in read:
            read[path] = read_hf_token(path)
        token = read[path]
        if isinstance(token, str):
            loaded.append(replace(host, hf_token=token))
            continue
        origin = host.source.origin_of(("engine", "hf_token_file")) or host.source.defined_at
        problems.append(
            Problem(
                file=origin.file,
                line=origin.line,
                key=HF_TOKEN_KEY,
                host=host.name,
                message=f"the Hugging Face token file {display_path(path)} {token[0]}",
                fix=token[1],
            )
        )
        loaded.append(host)
    return loaded
