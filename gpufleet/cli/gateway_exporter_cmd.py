"""`gpufleet gateway-exporter`: serve the gateway's requests by status from its access log (docs/gateway-exporter.md).

The flags and the run loop are gpufleet/gatewaylog/cli.py's, shared with `python -m
gpufleet.gatewaylog`, the form gateway hosts run from a zipapp without gpufleet's other
dependencies. This module only registers them as a `gpufleet` subcommand; it imports nothing but
the standard library and gpufleet.gatewaylog.
"""

from __future__ import annotations

import argparse
from typing import Any

from gpufleet.gatewaylog import cli


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "gateway-exporter",
        help="serve the gateway's requests by status, client and latency (its access log) to Prometheus",
        description=cli.DESCRIPTION,
    )
    cli.add_arguments(parser)
    parser.set_defaults(handler=run, gateway_exporter_parser=parser)


def run(args: argparse.Namespace) -> int:
    return cli.run(args, args.gateway_exporter_parser)
