"""The SLO gate and the report inside Locust: plain headless Locust ends with the gate's exit code.

    locust -f loadtests/locustfile.py,loadtests/ramp.py --headless --host http://127.0.0.1:8080 \\
        --gpufleet-api-key-file key --gpufleet-inventory inventories/local --gpufleet-report-dir reports/run1

With `--gpufleet-inventory`, the master (or the single process) reads the objectives from the
inventory's `slo` before any user starts (a bad inventory ends the run at once, exit 2), every
process samples its own CPU (cpu.py), and when Locust quits the gate judges the raw records
(gate.py), the report is written (report.py), the verdict is printed and becomes Locust's exit
code: 0 every SLO held, 1 one failed, 2 the run could not be judged. `gpufleet loadtest` runs
exactly this, with the target, key and objectives taken from the inventory.
"""

from __future__ import annotations

import logging
import sys
import weakref
from pathlib import Path
from typing import Any

import gevent
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from gpufleet.errors import ConfigError
from gpufleet.loadtest import collect, cpu, users
from gpufleet.loadtest.gate import EXIT_INVALID, SloSource, Verdict, evaluate, slo_from_fleet
from gpufleet.loadtest.report import ReportFiles, RunMeta, write_report
from gpufleet.loadtest.shapes import OpenLoopShape, StepRampShape
from gpufleet.paths import default_report_dir

log = logging.getLogger(__name__)

_SOURCES: weakref.WeakKeyDictionary[Environment, SloSource] = weakref.WeakKeyDictionary()  # read at init


def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("gpufleet SLO gate", "judge the run against an inventory's slo and report it")
    group.add_argument("--gpufleet-inventory", metavar="DIR", default=None,
                       help="inventory whose `slo` judges the run; sets the exit code (0 pass, 1 fail, 2 invalid) "
                            "and writes the report")
    group.add_argument("--gpufleet-slo-host", metavar="HOST", default=None,
                       help="the host whose slo applies when the inventory's hosts disagree")
    group.add_argument("--gpufleet-report-dir", metavar="DIR", default=None,
                       help="where the report goes (default reports/loadtest-<UTC date and time>)")
    group.add_argument("--gpufleet-prometheus-url", metavar="URL", default=None,
                       help="Prometheus to read VRAM and GPU use per step from (default none: no such columns)")
    group.add_argument("--gpufleet-gpu-selector", metavar="LABELS", default="",
                       help='PromQL labels of the GPUs under test, e.g. host="gpu-01"')


def install(events: Any) -> None:
    """Register the options and listeners on Locust's `events` (loadtests/locustfile.py does this)."""
    events.init_command_line_parser.add_listener(add_arguments)
    events.init.add_listener(_on_init)
    events.test_start.add_listener(_on_test_start)
    events.test_stop.add_listener(_on_test_stop)
    events.quitting.add_listener(_on_quitting)


def _gating(environment: Environment) -> bool:
    options = environment.parsed_options
    return bool(options is not None and getattr(options, "gpufleet_inventory", None))


def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        # a worker samples whenever it runs users: whether the master gates is the master's business
        sampler = cpu.CpuSampler(collect.attach(environment, cpu.collector(collect.WORKER, runner.send_message)),
                                 runner.client_id)
        runner.greenlet.spawn(_sample_forever, sampler)
        return
    if isinstance(runner, MasterRunner):  # takes the workers' samples even when it does not gate
        collect.attach(environment, cpu.collector(collect.MASTER))
    if not _gating(environment):
        return
    options = environment.parsed_options
    try:
        _SOURCES[environment] = slo_from_fleet(Path(options.gpufleet_inventory), host=options.gpufleet_slo_host)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(EXIT_INVALID)
    if not isinstance(environment.shape_class, StepRampShape | OpenLoopShape):
        log.error("--gpufleet-inventory: the SLO gate judges a run step by step, and no load shape is loaded; "
                  "add loadtests/ramp.py or loadtests/openloop.py to -f "
                  "(e.g. -f loadtests/locustfile.py,loadtests/ramp.py)")
        sys.exit(EXIT_INVALID)
    if not isinstance(runner, MasterRunner):
        sampler = cpu.CpuSampler(collect.attach(environment, cpu.collector(collect.LOCAL)), "local")
        runner.greenlet.spawn(_sample_forever, sampler)


def _sample_forever(sampler: cpu.CpuSampler) -> None:
    while True:
        gevent.sleep(cpu.SAMPLE_INTERVAL_S)
        sampler.sample()


def _on_test_start(environment: Environment, **_: Any) -> None:
    kept = cpu.collector_of(environment)
    if kept is not None:
        kept.clear()


def _on_test_stop(environment: Environment, **_: Any) -> None:
    kept = cpu.collector_of(environment)
    if kept is not None:
        kept.flush()


def _on_quitting(environment: Environment, **_: Any) -> None:
    source = _SOURCES.pop(environment, None)
    if source is None or isinstance(environment.runner, WorkerRunner):
        return
    users.finish_records(environment)  # Locust fires quitting in reverse: do not rely on users' listener first
    verdict = evaluate(collect.collected_records(environment), source,
                       client_cpu=cpu.collected_samples(environment))
    files = write_run_report(environment, verdict)
    print(describe_result(verdict, files), flush=True)
    environment.process_exit_code = verdict.exit_code


def write_run_report(environment: Environment, verdict: Verdict) -> ReportFiles:
    options = environment.parsed_options
    settings = users.settings_of(environment)
    out = options.gpufleet_report_dir or default_report_dir()
    meta = RunMeta(target=environment.host or "", model=settings.model or "(the server's default)",
                   api=settings.api, shape=_shape_text(environment),
                   extra={"prompts": getattr(options, "gpufleet_prompts", None),
                          "input_tokens": getattr(options, "gpufleet_input_tokens", None),
                          "max_tokens": settings.max_tokens, "seed": getattr(options, "gpufleet_seed", None),
                          "processes": getattr(options, "processes", None)})
    return write_report(out, verdict, meta, prometheus_url=options.gpufleet_prometheus_url or None,
                        prometheus_selector=options.gpufleet_gpu_selector or "")


def _shape_text(environment: Environment) -> str:
    shape = environment.shape_class
    if isinstance(shape, StepRampShape | OpenLoopShape):
        return shape.plan.describe()
    return "no load shape"


def describe_result(verdict: Verdict, files: ReportFiles) -> str:
    """What the terminal shows at the end: the verdict, its reasons, and where the report is."""
    return "\n".join([verdict.summary(), f"report: {files.markdown}", f"        {files.html}",
                      f"        {files.json}"])
