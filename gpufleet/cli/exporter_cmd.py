"""`gpufleet exporter`: serve the GPU metrics of this host to Prometheus (docs/exporter.md).

Made for a systemd unit: logs go to stderr, SIGTERM and SIGINT stop it cleanly (exit 0), bad flags
exit 2 with argparse's `error:` line before anything starts, and an address that cannot be bound
exits 1. NVML trouble never ends the process: it is reported in the metrics and retried.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from gpufleet.cli.sim_cmd import _positive_int
from gpufleet.listen import parse_listen_flag

DEFAULT_LISTEN = "127.0.0.1:9835"
LOG_LEVELS = ("debug", "info", "warning", "error")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "exporter",
        help="serve this host's GPU metrics (NVML) to Prometheus",
        description="Serve this host's GPU metrics to Prometheus. A background thread samples every GPU "
        "through NVML each --interval; scrapes read the latest sample and never wait on the driver. "
        "--simulate N serves N stand-in GPUs driven by simulated engines instead (the test bed).",
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to serve /metrics on (default: {DEFAULT_LISTEN}; [::1]:PORT for IPv6)")
    parser.add_argument("--interval", type=_positive_seconds, default=5.0, metavar="SECONDS",
                        help="seconds between two samples of the GPUs (default: 5)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")
    sim = parser.add_argument_group("simulation (the one-machine test bed; no GPU needed)")
    sim.add_argument("--simulate", type=_positive_int, metavar="N",
                     help="serve N stand-in GPUs instead of reading NVML (labelled mode=\"simulate\")")
    sim.add_argument("--simulate-gpu", default=None, metavar="ID",
                     help="catalogue GPU the stand-ins are (default: rtx-4090d; `gpufleet plan --catalogue`)")
    sim.add_argument("--engine-url", action="append", default=[], metavar="URL",
                     help="a simulated engine whose load drives its GPUs, e.g. http://127.0.0.1:8000 (repeatable)")
    sim.add_argument("--engine-gpus", action="append", default=[], metavar="LIST",
                     help="the GPU indices of the --engine-url at the same position, e.g. 0,1 (repeatable; "
                     "may be left out for a single engine on every GPU)")
    parser.set_defaults(handler=run, exporter_parser=parser)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """('127.0.0.1', 9835) from '127.0.0.1:9835', ('::1', 9835) from '[::1]:9835'; ValueError if malformed."""
    return parse_listen_flag(text, DEFAULT_LISTEN)


def parse_gpu_list(text: str) -> tuple[int, ...]:
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--engine-gpus {text!r}: expected GPU indices separated by commas, e.g. 0,1") from None
    if len(set(indices)) != len(indices):
        raise ValueError(f"--engine-gpus {text!r}: a GPU is listed twice")
    return indices


def engine_sources(args: argparse.Namespace) -> list[Any]:
    """The --engine-url/--engine-gpus pairs; ValueError for anything that does not fit together."""
    from gpufleet.exporter.simulate import EngineSource, metrics_url

    urls, lists = args.engine_url, args.engine_gpus
    if args.simulate is None:
        if urls or lists or args.simulate_gpu:
            raise ValueError("--engine-url, --engine-gpus and --simulate-gpu only go with --simulate N")
        return []
    if lists and len(lists) != len(urls):
        raise ValueError(f"{len(urls)} --engine-url but {len(lists)} --engine-gpus: give one GPU list per engine")
    if not lists and len(urls) > 1:
        raise ValueError("several --engine-url: say which GPUs each runs on with one --engine-gpus per engine")
    gpu_lists = [parse_gpu_list(text) for text in lists] or [tuple(range(args.simulate))] * len(urls)
    return [EngineSource(metrics_url(url), gpus) for url, gpus in zip(urls, gpu_lists, strict=True)]


def run(args: argparse.Namespace) -> int:
    from gpufleet.exporter.nvml import Nvml
    from gpufleet.exporter.service import Exporter
    from gpufleet.exporter.simulate import DEFAULT_GPU, Simulation

    parser: argparse.ArgumentParser = args.exporter_parser
    try:
        host, port = parse_listen(args.listen)
        engines = engine_sources(args)
        simulation = (
            Simulation(args.simulate, engines, gpu_id=args.simulate_gpu or DEFAULT_GPU)
            if args.simulate is not None else None
        )
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gpufleet.exporter")
    if simulation is not None:
        exporter = Exporter(Nvml(simulation.fake), interval=args.interval, mode="simulate",
                            before_sample=simulation.refresh, process_name=simulation.fake.process_name)
    else:
        exporter = Exporter(Nvml(), interval=args.interval)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        bound = exporter.listen(host, port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc)
        return 1
    exporter.start()
    shown = f"[{host}]" if ":" in host else host
    if simulation is not None:
        log.warning("SIMULATED GPUs: %d stand-in %s driven by %d engine(s); not a real GPU's readings",
                    args.simulate, simulation.fake.gpus[0].name, len(engines))
    log.info("serving GPU metrics on http://%s:%d/metrics, sampling every %g s", shown, bound, args.interval)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    exporter.stop()
    return 0
