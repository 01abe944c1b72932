"""Entry point of the agent zipapp: `python3 gpufleet-agent.pyz exporter|gateway-exporter ...`.

Registers only the host-side commands, so it imports nothing beyond the standard library and the
dependencies bundle.py packs (prometheus_client, pynvml, PyYAML's pure-Python part).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gpufleet import __version__


def build_parser() -> argparse.ArgumentParser:
    from gpufleet.cli import exporter_cmd, gateway_exporter_cmd

    parser = argparse.ArgumentParser(prog="gpufleet-agent", description="gpufleet's services on a fleet host.")
    parser.add_argument("--version", action="version", version=f"gpufleet-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (exporter_cmd, gateway_exporter_cmd):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
