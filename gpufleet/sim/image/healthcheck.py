"""The simulator image's HEALTHCHECK: exit 0 when the server's /health answers 200, 1 otherwise.

Runs as `/usr/bin/python3 -I -S healthcheck.py` (stdlib only, no curl in the image). The port is
read from the running `gpufleet sim serve` command line, so a container started with its own
--port is still probed where it listens; the default is 8000 (the image's CMD).
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8000
TIMEOUT_S = 2.0


def serve_args() -> list[str]:
    """Arguments after `sim serve` of the server process (PID 1 normally; any PID under --init)."""
    proc = Path("/proc")
    pids = sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for pid in pids:
        try:
            argv = (pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv if w]
        for i in range(len(words) - 1):
            if words[i] == "sim" and words[i + 1] == "serve":
                return words[i + 2 :]
    return []


def option(args: list[str], name: str) -> str | None:
    """The last value of `--name V` or `--name=V`, as argparse would take it."""
    value = None
    for i, word in enumerate(args):
        if word == name and i + 1 < len(args):
            value = args[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def health_url(args: list[str]) -> str:
    port = option(args, "--port") or str(DEFAULT_PORT)
    host = option(args, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # bound to every address: loopback is one of them
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def main() -> int:
    url = health_url(serve_args())
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            ok = response.status == 200
    except Exception as exc:  # any failure is "unhealthy"; say why in `docker inspect`'s log
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {'ok' if ok else 'status ' + str(response.status)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
