"""The load shapes' command-line options: the step ramp's levels and the open loop's rates.

loadtests/ramp.py and loadtests/openloop.py each call `install(events)`; the options are
registered once whichever of them is loaded, and applied to the running shape at init and, on
workers (whose options come from the master with each spawn), again at test start. A level list
that cannot be a plan ends the run before any user starts (exit 2).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from locust.env import Environment
from locust.runners import WorkerRunner

from gpufleet.loadtest import users
from gpufleet.loadtest.schedule import (
    DEFAULT_MEASURE_S,
    DEFAULT_RATES,
    DEFAULT_WARMUP_S,
    SEED_CONCURRENCY,
    OpenLoopPlan,
    concurrency_plan,
    levels_text,
    parse_list,
)
from gpufleet.loadtest.shapes import OpenLoopDispatcher, OpenLoopShape, StepRampShape

log = logging.getLogger(__name__)

_INSTALLED: set[int] = set()  # id(events) already wired


def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("gpufleet load shape", "the step ramp (ramp.py) or open-loop rates (openloop.py)")
    group.add_argument("--gpufleet-concurrency", metavar="N,N,...", default=levels_text(SEED_CONCURRENCY),
                       help=f"ramp: the concurrency of each step (default the seed's {levels_text(SEED_CONCURRENCY)})")
    group.add_argument("--gpufleet-rates", metavar="R,R,...", default=levels_text(DEFAULT_RATES),
                       help=f"open loop: requests per second of each step (default {levels_text(DEFAULT_RATES)})")
    group.add_argument("--gpufleet-burstiness", metavar="B", type=float, default=1.0,
                       help="open loop: gamma shape of the gaps; 1 Poisson (default), inf a constant rate")
    group.add_argument("--gpufleet-max-in-flight", metavar="N", type=int, default=None,
                       help="open loop: requests outstanding at once; later arrivals wait and show as dispatch lag")
    group.add_argument("--gpufleet-warmup-s", metavar="S", type=float, default=DEFAULT_WARMUP_S,
                       help=f"seconds of each step before it is measured (default {DEFAULT_WARMUP_S:g})")
    group.add_argument("--gpufleet-measure-s", metavar="S", type=float, default=DEFAULT_MEASURE_S,
                       help=f"seconds each step is measured (default {DEFAULT_MEASURE_S:g})")


def install(events: Any) -> None:
    if id(events) in _INSTALLED:
        return
    _INSTALLED.add(id(events))
    events.init_command_line_parser.add_listener(add_arguments)
    events.init.add_listener(_on_init)
    events.test_start.add_listener(_on_test_start)


def apply(environment: Environment) -> None:
    """Set the running shape's plan from the options (ValueError when they cannot make one)."""
    options = environment.parsed_options
    shape = environment.shape_class
    if options is None:
        return
    if isinstance(shape, StepRampShape):
        levels = parse_list("--gpufleet-concurrency", options.gpufleet_concurrency, int)
        try:
            shape.set_plan(concurrency_plan(levels, options.gpufleet_warmup_s, options.gpufleet_measure_s))
        except ValueError as exc:
            raise ValueError(f"--gpufleet-concurrency/--gpufleet-warmup-s/--gpufleet-measure-s: {exc}") from None
        if not environment.stop_timeout:
            # the ramp's end stops users gracefully (StepRampShape._drain): each finishes its request
            environment.stop_timeout = shape.drain_s
    elif isinstance(shape, OpenLoopShape):
        rates = parse_list("--gpufleet-rates", options.gpufleet_rates, float)
        burstiness = options.gpufleet_burstiness
        try:
            shape.plan = OpenLoopPlan(rates=rates, warmup_s=options.gpufleet_warmup_s,
                                      measure_s=options.gpufleet_measure_s,
                                      burstiness=math.inf if math.isinf(burstiness) else burstiness,
                                      seed=int(getattr(options, "gpufleet_seed", 0) or 0),
                                      max_in_flight=options.gpufleet_max_in_flight)
        except ValueError as exc:
            raise ValueError(f"--gpufleet-rates/--gpufleet-burstiness/--gpufleet-max-in-flight: {exc}") from None
        shape.dispatcher = _dispatcher(environment)


def _dispatcher(environment: Environment) -> type[OpenLoopDispatcher]:
    api = users.settings_of(environment).api
    found = [c for c in environment.user_classes
             if issubclass(c, OpenLoopDispatcher) and getattr(c, "api", None) == api]
    if len(found) != 1:
        raise ValueError(f"open loop: expected one dispatcher for --gpufleet-api {api} among the user classes, "
                         f"found {[c.__name__ for c in found]}")
    return found[0]


def _on_init(environment: Environment, **_: Any) -> None:
    try:
        apply(environment)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(2)


def _on_test_start(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        return
    try:
        apply(environment)
    except ValueError as exc:
        log.error("%s", exc)
        environment.runner.quit()
