"""The gateway exporter's command line: `gpufleet gateway-exporter`, and `python -m gpufleet.gatewaylog`.

It lives in this package, not in gpufleet/cli/, because gateway hosts run it from a zipapp that
holds this package and prometheus_client only: importing anything under gpufleet.cli imports the
`gpufleet` command (rich, the planner, pydantic). gpufleet/cli/gateway_exporter_cmd.py registers
these same flags and `run` as the `gpufleet gateway-exporter` subcommand.

Made for a systemd unit: logs go to stderr, SIGTERM and SIGINT stop it cleanly (exit 0), bad flags
exit 2 with argparse's `error:` line before anything starts, and an address that cannot be bound
exits 1. A missing or unreadable log never ends the process: it is `gpufleet_gateway_log_up 0`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence

from gpufleet.listen import parse_listen_flag

DEFAULT_LOG = "/var/log/nginx/gpufleet-access.log"  # roles/gateway's GatewayPaths.access_log
DEFAULT_LISTEN = "127.0.0.1:9145"
LOG_LEVELS = ("debug", "info", "warning", "error")
DESCRIPTION = (
    "Serve the gateway's requests by status and client, and their latency, to Prometheus, read from "
    "nginx's JSON access log (format gpufleet_json). The log is followed like `tail -F` from its end "
    "when the exporter starts, across logrotate's rename and copytruncate rotations."
)


def parse_listen(text: str) -> tuple[str, int]:
    """('127.0.0.1', 9145) from '127.0.0.1:9145', ('::1', 9145) from '[::1]:9145'; ValueError if malformed."""
    return parse_listen_flag(text, DEFAULT_LISTEN)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", default=DEFAULT_LOG, metavar="PATH",
                        help=f"the gateway's JSON access log (default: {DEFAULT_LOG})")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to serve /metrics on (default: {DEFAULT_LISTEN}; [::1]:PORT for IPv6)")
    parser.add_argument("--model-name", required=True, metavar="NAME",
                        help="the model the gateway serves (its served name), the model_name label of every "
                        "request series, e.g. qwen2.5-7b-instruct")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet-gateway-exporter", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpufleet.gatewaylog.service import GatewayLogExporter

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    if not args.model_name.strip():
        parser.error("--model-name: give the gateway's served model name, e.g. qwen2.5-7b-instruct")
    if not args.log:
        parser.error("--log: give the access log's path")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gpufleet.gatewaylog")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    exporter = GatewayLogExporter(args.log, args.model_name)
    exporter.start()  # the log's end is the start: what nginx writes from now on is counted
    try:
        bound = exporter.listen(host, port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc)
        exporter.stop()
        return 1
    shown = f"[{host}]" if ":" in host else host
    log.info("serving the metrics of %s (model %s) on http://%s:%d/metrics", args.log, args.model_name, shown, bound)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    exporter.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
