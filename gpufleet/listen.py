"""`--listen HOST:PORT` for the host-side services (standard library only: the agent zipapp imports it)."""

from __future__ import annotations


def parse_listen_flag(text: str, example: str) -> tuple[str, int]:
    """('127.0.0.1', 9835) from '127.0.0.1:9835', ('::1', 9835) from '[::1]:9835'; ValueError naming `example`."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        port = example.rpartition(":")[2]
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. {example} or [::1]:{port}")
    return host, int(port_text)
