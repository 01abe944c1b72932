"""`gpufleet` subcommands. Configuration problems print as file/key/fix and exit 2, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from gpufleet import __version__
from gpufleet.errors import EXIT_CONFIG_ERROR, ConfigError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpufleet",
        description="Provision NVIDIA GPU servers into a monitored, rate-limited LLM inference service.",
        epilog="Deploy with pyinfra: pyinfra inventories/<fleet>/inventory.py deploy/site.py",
    )
    parser.add_argument("--version", action="version", version=f"gpufleet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from gpufleet.cli import exporter_cmd, inventory_cmd, keys_cmd, loadtest_cmd, plan_cmd, sim_cmd, validate_cmd

    for module in (validate_cmd, plan_cmd, inventory_cmd, keys_cmd, loadtest_cmd, sim_cmd, exporter_cmd):
        module.register(commands)
    from gpufleet.cli import gateway_exporter_cmd  # imports no more than the gateway hosts' zipapp has

    gateway_exporter_cmd.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "errors": [p.to_dict() for p in exc.problems]}, indent=2, default=str))
        else:
            print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130


def console() -> Console:
    # rich wraps at the terminal width; pipes and CI get a wide fixed width so tables stay whole
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def inventory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inventory", type=Path, help="inventory folder, e.g. inventories/example")
