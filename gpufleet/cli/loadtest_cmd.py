"""`gpufleet loadtest INVENTORY`: the SLO ramp (or open-loop rates) through the inventory's gateway.

It reads the gateway's URL, the load test client's key, the served model, the SLOs and the
Prometheus from the inventory, checks the target answers, then runs headless Locust with
loadtests/locustfile.py and the shape (the same run a person can start by hand), which gates the
run and writes the report. The exit code is the gate's: 0 every SLO held, 1 one failed, 2 the run
could not be judged (including a target that does not answer, or a bad inventory).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gpufleet.cli.main import inventory_argument
from gpufleet.errors import EXIT_CONFIG_ERROR
from gpufleet.loadtest.prompts import SEED_INPUT_LENGTHS, SEED_OUTPUT_TOKENS
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
from gpufleet.loadtest.sse import APIS, OPENAI_CHAT
from gpufleet.loadtest.target import LOADTEST_CLIENT, resolve
from gpufleet.paths import REPO_ROOT, default_report_dir

LOADTESTS = REPO_ROOT / "loadtests"
SHAPE_FILES = {"ramp": LOADTESTS / "ramp.py", "open-loop": LOADTESTS / "openloop.py"}
PREFLIGHT_TIMEOUT_S = 10.0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "loadtest", help="run the SLO load test through the gateway, gate it and write the report",
        description="Run the seed's concurrency ramp (or open-loop rates) through the inventory's gateway with "
        "Locust, judge every step against the inventory's slo and write the report (Markdown, HTML, JSON, "
        "plots). Exit 0: every SLO held; 1: one failed; 2: the run could not be judged.",
    )
    inventory_argument(parser)
    where = parser.add_argument_group("target")
    where.add_argument("--gateway", metavar="HOST", help="the gateway host to load (default: the first)")
    where.add_argument("--target", metavar="URL", help="send the load here instead of the gateway's address "
                       "(a tunnel; the key, model and SLOs still come from the inventory)")
    where.add_argument("--client", default=LOADTEST_CLIENT, help="the keys file's client whose key is sent; it "
                       f"must be in gateway.unlimited_clients (default {LOADTEST_CLIENT})")
    where.add_argument("--api", choices=APIS, default=OPENAI_CHAT, help=f"the API to load (default {OPENAI_CHAT})")
    where.add_argument("--prometheus", metavar="URL", help="Prometheus for the VRAM and GPU utilization columns "
                       "(default: the inventory's monitoring host, when this machine reaches it)")
    where.add_argument("--no-prometheus", action="store_true", help="leave the GPU columns out")
    shape = parser.add_argument_group("load")
    shape.add_argument("--shape", choices=sorted(SHAPE_FILES), default="ramp",
                       help="ramp: closed-loop concurrency steps (default); open-loop: arrival rates")
    shape.add_argument("--concurrency", metavar="N,N,...", default=levels_text(SEED_CONCURRENCY),
                       help=f"ramp steps (default the seed's {levels_text(SEED_CONCURRENCY)})")
    shape.add_argument("--rates", metavar="R,R,...", default=levels_text(DEFAULT_RATES),
                       help=f"open-loop requests/s per step (default {levels_text(DEFAULT_RATES)})")
    shape.add_argument("--burstiness", type=float, default=1.0, help="open loop: 1 Poisson (default), inf constant")
    shape.add_argument("--max-in-flight", type=int, help="open loop: cap on requests outstanding")
    shape.add_argument("--warmup-s", type=float, default=DEFAULT_WARMUP_S,
                       help=f"warm-up of each step, left out (default {DEFAULT_WARMUP_S:g})")
    shape.add_argument("--measure-s", type=float, default=DEFAULT_MEASURE_S,
                       help=f"measured seconds of each step (default {DEFAULT_MEASURE_S:g})")
    shape.add_argument("--prompts", choices=("synthetic", "chat-set"), default="synthetic",
                       help="synthetic: exact input and output lengths (default); chat-set: the shipped chat prompts")
    shape.add_argument("--input-tokens", type=int, default=SEED_INPUT_LENGTHS[0],
                       help=f"synthetic prompt length (default the seed's {SEED_INPUT_LENGTHS[0]})")
    shape.add_argument("--output-tokens", type=int, default=SEED_OUTPUT_TOKENS,
                       help=f"output length, forced (default the seed's {SEED_OUTPUT_TOKENS})")
    shape.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    shape.add_argument("--processes", type=int, default=1,
                       help="Locust worker processes on this machine (one per core for high loads; default 1)")
    shape.add_argument("--sweep", action="store_true",
                       help="find the highest concurrency (ramp) or rate (open loop) meeting every SLO: one run per "
                       "level in order, then bisection between the last pass and the first fail")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="report folder (default reports/loadtest-<UTC time>)")
    out.add_argument("--web", action="store_true",
                     help="run with Locust's web UI on 127.0.0.1:8089 instead of headless (start it from the page)")
    out.add_argument("--print-command", action="store_true",
                     help="print the Locust command it would run (the key file shown as a placeholder) and exit")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gpufleet.fleet import load_fleet

    problem = argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    fleet = load_fleet(args.inventory)
    target = resolve(fleet, gateway=args.gateway, client=args.client, url=args.target,
                     prometheus_url="" if args.no_prometheus else args.prometheus)
    prometheus = None if args.no_prometheus else target.prometheus_url
    report_dir = args.out or default_report_dir()
    for note in target.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.print_command:
        print(shlex.join(locust_command(args, target, "<key file>", report_dir, prometheus)))
        return 0
    failure = preflight(target.url, target.api_key)
    if failure:
        message, fix = failure
        print(f"error: {message}\n  fix: {fix}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"load test: {target.url} ({target.gateway}), model {target.served_name}, slo of {target.slo_host}, "
          f"report in {report_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpufleet-loadtest-") as private:
        key_file = Path(private) / "api_key"  # the folder is 0700; the file 0600: the key never reaches argv
        key_file.touch(mode=0o600)
        key_file.write_text((target.api_key or "") + "\n", encoding="utf-8")
        if args.sweep:
            return run_sweep(args, target, str(key_file), report_dir, prometheus)
        command = locust_command(args, target, str(key_file), report_dir, prometheus)
        return subprocess.run(command, cwd=REPO_ROOT, check=False).returncode


def run_sweep(args: argparse.Namespace, target: Any, key_file: str, report_dir: str, prometheus: str | None) -> int:
    """One single-step run per trial (each with its own report folder), searched by gpufleet.loadtest.sweep.

    A trial the gate calls invalid (exit 2) ends the search: its level was neither met nor missed.
    """
    from gpufleet.loadtest.sweep import sweep_concurrency, sweep_rate

    ramp = args.shape == "ramp"

    def trial(value: float) -> bool:
        level = str(int(value)) if ramp else f"{value:g}"
        name = f"concurrency-{level}" if ramp else f"rate-{level}"
        single = argparse.Namespace(**{**vars(args), "concurrency": level, "rates": level})
        print(f"sweep: {name}", flush=True)
        code = subprocess.run(locust_command(single, target, key_file, str(Path(report_dir) / name), prometheus),
                              cwd=REPO_ROOT, check=False).returncode
        if code not in (0, 1):
            raise InvalidTrial(name, code)
        return code == 0

    try:
        if ramp:
            result = sweep_concurrency(trial, parse_list("--concurrency", args.concurrency, int))
        else:
            result = sweep_rate(trial, parse_list("--rates", args.rates, float))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except InvalidTrial as exc:
        print(f"sweep stopped: {exc.name} could not be judged (exit {exc.code}); see its report in {report_dir}",
              flush=True)
        return exc.code
    unit = "concurrency" if ramp else "requests/s"
    tried = ", ".join(f"{value:g} {'pass' if passed else 'fail'}" for value, passed in result.trials)
    if result.best is None:
        print(f"sweep: no {unit} met every SLO ({tried}); reports in {report_dir}")
        return 1
    ceiling = "above the levels tried" if result.first_fail is None else f"{result.first_fail:g} failed"
    print(f"sweep: highest {unit} meeting every SLO: {result.best:g} ({ceiling}; {tried}); reports in {report_dir}")
    return 0


class InvalidTrial(Exception):
    def __init__(self, name: str, code: int) -> None:
        super().__init__(name)
        self.name = name
        self.code = code


def argument_problem(args: argparse.Namespace) -> str | None:
    if args.prompts == "chat-set" and args.api != OPENAI_CHAT:
        return "--prompts chat-set holds chat messages: use it with --api openai-chat, or --prompts synthetic"
    if args.processes < 1:
        return f"--processes must be >= 1, got {args.processes}"
    if args.input_tokens < 1 or args.output_tokens < 1:
        return "--input-tokens and --output-tokens must be >= 1"
    try:  # the plan Locust would build, built here first: a bad level fails before any request
        if args.shape == "ramp":
            concurrency_plan(parse_list("--concurrency", args.concurrency, int), args.warmup_s, args.measure_s)
        else:
            OpenLoopPlan(rates=parse_list("--rates", args.rates, float), warmup_s=args.warmup_s,
                         measure_s=args.measure_s, burstiness=args.burstiness, max_in_flight=args.max_in_flight)
    except ValueError as exc:
        return f"{exc} (--concurrency/--rates, --warmup-s, --measure-s, --burstiness, --max-in-flight)"
    return None


def locust_command(args: argparse.Namespace, target: Any, key_file: str, report_dir: str,
                   prometheus: str | None) -> list[str]:
    """The Locust command line for this run: every value from the inventory or the arguments."""
    files = f"{LOADTESTS / 'locustfile.py'},{SHAPE_FILES[args.shape]}"
    command = [sys.executable, "-m", "locust", "-f", files, "--host", target.url,
               "--gpufleet-api-key-file", key_file, "--gpufleet-api", args.api,
               "--gpufleet-model", target.served_name, "--gpufleet-max-tokens", str(args.output_tokens),
               "--gpufleet-prompts", args.prompts, "--gpufleet-input-tokens", str(args.input_tokens),
               "--gpufleet-seed", str(args.seed),
               "--gpufleet-inventory", str(args.inventory), "--gpufleet-slo-host", target.slo_host,
               "--gpufleet-report-dir", report_dir,
               "--gpufleet-records-file", str(Path(report_dir) / "records.jsonl"),
               "--gpufleet-warmup-s", f"{args.warmup_s:g}", "--gpufleet-measure-s", f"{args.measure_s:g}"]
    if args.shape == "ramp":
        command += ["--gpufleet-concurrency", args.concurrency]
    else:
        command += ["--gpufleet-rates", args.rates, "--gpufleet-burstiness", f"{args.burstiness:g}"]
        if args.max_in_flight:
            command += ["--gpufleet-max-in-flight", str(args.max_in_flight)]
    if prometheus:
        command += ["--gpufleet-prometheus-url", prometheus, "--gpufleet-gpu-selector", target.gpu_selector]
    if args.processes > 1:
        command += ["--processes", str(args.processes)]
    if args.web:
        command += ["--web-host", "127.0.0.1", "--web-port", "8089"]
    else:
        command += ["--headless", "--only-summary"]
    return command


def preflight(url: str, api_key: str | None) -> tuple[str, str] | None:
    """None when the target answers `GET /v1/models` with the key; else (what went wrong, how to fix it)."""
    probe = f"{url}/v1/models"
    request = urllib.request.Request(probe, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    down = "check that the gateway and its engines are up: pyinfra -y INVENTORY/inventory.py deploy/site.py"
    try:
        with urllib.request.urlopen(request, timeout=PREFLIGHT_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            return (f"GET {probe}: HTTP 401, the key was refused",
                    "deploy the gateway again after adding keys: pyinfra -y INVENTORY/inventory.py deploy/gateway.py")
        return f"GET {probe}: HTTP {exc.code}", down
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"GET {probe}: the target does not answer ({getattr(exc, 'reason', exc)})", down
    try:
        json.loads(body)
    except ValueError:
        return (f"GET {probe}: answered 200 but not with JSON: something other than the gateway listens there",
                "check the address and port (gateway.listen, or --target)")
    return None
