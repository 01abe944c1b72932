"""Sizes and addresses written the way Docker and nginx read them."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgtp])?i?b?$", re.IGNORECASE)
_FACTORS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes in a Docker-style size ('32g', '8GiB', '512m'); units are binary, as Docker's are."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size; write a number with a unit, e.g. '32g' or '512m'")
    number, unit = match.groups()
    return int(float(number) * _FACTORS[unit.lower() if unit else None])


def parse_listen(text: str) -> tuple[str, int]:
    """(address, port) from 'address:port', '[v6]:port' or a bare port."""
    value = text.strip()
    if value.isdigit():
        host, port_text = "0.0.0.0", value
    elif value.startswith("["):
        host, _, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port; write address:port, e.g. '0.0.0.0:8080'")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has no valid port (1-65535); write address:port, e.g. '0.0.0.0:8080'")
    return host, int(port_text)
