"""The demo's chain: the commands an operator runs, in order, each logged, with a progress display.

    python -m gpufleet.demo up [--inventory inventories/local]     # make demo
    python -m gpufleet.demo down [--all]                           # make demo-down (--all)

Every step is a real command (the test bed's image builder and harness, the pyinfra CLI, `gpufleet
loadtest`), so the demo shows exactly what the make targets and the docs tell a user to type, and
a step that fails leaves a log a user can read and a command they can re-run alone. The run folder
(reports/demo-<UTC>/) keeps each step's log, the load test's report and demo.json (each step's
duration, the verdict, the URLs), which benchmarks/bench_demo.py reads.

A second `make demo` reuses what the first left: cached images, the running hosts (the harness
reuses them), a site run that finds nothing to change. That is the warm run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from gpufleet.agent.bundle import DEFAULT_OUT as AGENT_BUNDLE
from gpufleet.cli.loadtest_cmd import argument_problem
from gpufleet.cli.main import build_parser
from gpufleet.demo.progress import Progress, clock
from gpufleet.errors import ConfigError, Problem
from gpufleet.fleet import Fleet, load_fleet
from gpufleet.loadtest.prompts import SEED_INPUT_LENGTHS, SEED_OUTPUT_TOKENS
from gpufleet.loadtest.schedule import DEFAULT_MEASURE_S, DEFAULT_WARMUP_S, SEED_CONCURRENCY, levels_text
from gpufleet.loadtest.target import LOADTEST_CLIENT
from gpufleet.paths import REPO_ROOT, display_path
from gpufleet.pyinfra_output import RunWatcher, grand_total, plain
from gpufleet.testbed import bed, images
from gpufleet.testbed import hosts as testbed

DEFAULT_INVENTORY = bed.DEFAULT_INVENTORY
REPORTS = REPO_ROOT / "reports"
BIN = Path(sys.executable).parent
# The demo's ramp: the seed's first steps with short prompts and answers, so each step gathers the
# 100 requests a p99 needs (concurrency 1: ~130 in 30 s; 20 s gave 89) and the ramp takes under
# two minutes (the seed's 512/512 ramp with 2-minute steps is `make loadtest`'s, about 16 minutes).
DEMO_RAMP = ("--concurrency", "1,4,8", "--warmup-s", "3", "--measure-s", "30",
             "--input-tokens", "128", "--output-tokens", "32")
LOG_TAIL_LINES = 25


class StepFailed(RuntimeError):
    """A step's command exited non-zero; the message has its log's tail and where the whole log is."""


@dataclass
class Step:
    """One command of the chain; `watch` turns an output line into what the display shows (or None)."""

    name: str  # its log file: logs/<n>-<name>.log
    title: str
    command: list[str]
    watch: Callable[[str], str | None]
    note: Callable[[str], str] = lambda _output: ""
    ok_codes: tuple[int, ...] = (0,)
    # on failure, what of the output explains it (default: its last lines)
    explain: Callable[[list[str]], list[str]] = lambda lines: lines[-LOG_TAIL_LINES:]


@dataclass
class StepResult:
    title: str
    command: str
    seconds: float
    exit_code: int
    log: str


@dataclass
class DemoResult:
    inventory: str
    run_dir: str
    started: str
    steps: list[StepResult] = field(default_factory=list)
    seconds: float = 0.0
    verdict: dict = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)


def harness_watch(line: str) -> str | None:
    """The image builder's and the harness's own messages (`gpufleet.testbed: ...`)."""
    text = plain(line)
    return text.removeprefix("gpufleet.testbed: ") if text.startswith("gpufleet.testbed: ") else None


def loadtest_watch(line: str) -> str | None:
    """Locust's step changes and the gate's verdict lines."""
    text = plain(line)
    if "Shape test updating to" in text:
        users = text.split("Shape test updating to", 1)[1].split("users", 1)[0].strip()
        return "draining the last step" if users == "0" else f"concurrency {users}"
    if text.startswith(("load test:", "SLO gate:", "highest ")):
        return text
    return None


def loadtest_explain(lines: list[str]) -> list[str]:
    """The gate's own account (from "SLO gate:" to the report's paths) or the command's errors;
    Locust's statistics table says nothing about why."""
    text = [plain(line) for line in lines]
    start = next((i for i, line in enumerate(text) if line.startswith("SLO gate:")), None)
    if start is not None:
        end = next((i for i in range(start, len(text)) if text[i].startswith("report:")), len(text) - 1) + 1
        while end < len(lines) and lines[end].startswith(" "):  # the report's other files
            end += 1
        return lines[start:end]
    errors = [line for line, shown in zip(lines, text, strict=True) if shown.startswith(("error:", "fix:"))]
    return errors or lines[-LOG_TAIL_LINES:]


def site_note(output: str) -> str:
    totals = grand_total(output)
    if totals is None:
        return ""
    return f"{totals['changed']} operations changed, {totals['unchanged']} unchanged (summed over the hosts)"


def run_step(step: Step, log_path: Path, progress: Progress, index: int) -> StepResult:
    """Run the step's command, its output to `log_path` and the display; StepFailed on an exit code not in ok_codes."""
    progress.start(index)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(step.command)}\n")
        proc = subprocess.Popen(step.command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            shown = step.watch(line)
            if shown:
                progress.detail(shown)
        code = proc.wait()
    output = "".join(lines)
    ok = code in step.ok_codes
    took = progress.finish(ok, step.note(output) if ok else f"exit {code}")
    result = StepResult(step.title, shlex.join(step.command), round(took, 1), code, display_path(log_path))
    if not ok:
        tail = "".join(plain(line) + "\n" for line in step.explain(lines))
        raise StepFailed(f"{step.title} failed (exit {code}): {shlex.join(step.command)}\n{tail}"
                         f"whole log: {display_path(log_path)}; re-run that command alone to retry this step")
    return result


def chain(inventory: Path, run_dir: Path, ramp: Sequence[str], gateway: str) -> list[Step]:
    python, inv = str(BIN / "python"), str(display_path(inventory))
    return [
        Step("images", "Docker and the test bed's images", [python, "-m", "gpufleet.testbed.images"], harness_watch),
        Step("testbed", f"test bed hosts of {inv}", [python, "-m", "gpufleet.testbed", "up", inv], harness_watch),
        Step("site", "deploy/site.py: every role on every host",
             [str(BIN / "pyinfra"), "-y", f"{inv}/inventory.py", "deploy/site.py"], RunWatcher().feed, site_note),
        # exit 1 is a verdict (an SLO failed), not a broken step: the summary reports it
        Step("loadtest", f"SLO ramp through {gateway}'s gateway",
             [str(BIN / "gpufleet"), "loadtest", inv, "--gateway", gateway,
              "--out", str(display_path(run_dir / "loadtest")), *ramp],
             loadtest_watch, ok_codes=(0, 1), explain=loadtest_explain),
    ]


def check_test_bed(fleet: Fleet) -> None:
    """The demo starts its hosts as containers on this machine: every host must be a test bed host."""
    real = [h.name for h in fleet.hosts if h.config.ansible_connection != "docker"]
    if real:
        raise ConfigError([Problem(
            file=str(display_path(Path(fleet.inventory.hosts_file))), key="ansible_connection", host=", ".join(real),
            message="the demo runs on this machine's test bed, and these hosts are not test bed hosts "
                    "(ansible_connection: docker)",
            fix="run the demo on inventories/local; for real hosts follow docs/real-hosts.md "
                "(pyinfra INVENTORY/inventory.py deploy/site.py, then gpufleet loadtest INVENTORY)")])


def check_ramp(inventory: Path, ramp: Sequence[str]) -> None:
    """The ramp's options parsed and checked as `gpufleet loadtest` will, so a bad one stops the demo
    before any image is built or host started (ValueError; argparse has printed its own message)."""
    try:
        args = build_parser().parse_args(["loadtest", str(inventory), *ramp])
    except SystemExit as exc:
        raise ValueError(f"--ramp {shlex.join(ramp)!r}: gpufleet loadtest refuses these options (see above); "
                         f"the default is {shlex.join(DEMO_RAMP)!r}") from exc
    problem = argument_problem(args)
    if problem:
        raise ValueError(f"--ramp: {problem}")


def first_gateway(fleet: Fleet) -> str:
    gateways = [h.name for h in fleet.hosts if h.gateway is not None]
    if not gateways:
        raise ValueError(f"{display_path(fleet.root)}: no host in the gateway group; the demo's load test goes "
                         "through a gateway (see inventories/local/hosts.yml)")
    return gateways[0]


def service_urls(fleet: Fleet) -> dict[str, str]:
    """What a user opens next: each gateway on this machine's loopback, the monitoring services."""
    urls: dict[str, str] = {}
    gateways = bed.gateway_ports(fleet)
    for fleet_host in fleet.hosts:
        for port in gateways.get(fleet_host.name, []):
            urls[f"gateway {fleet_host.name}"] = f"http://127.0.0.1:{bed.published_port(fleet_host, port)}"
    monitoring = fleet.in_group("monitoring")
    for fleet_host in monitoring:
        for name, url in bed.monitoring_urls(fleet_host):
            urls[name if len(monitoring) == 1 else f"{name} {fleet_host.name}"] = url
    return urls


def read_verdict(report_dir: Path) -> dict:
    data = json.loads((report_dir / "loadtest.json").read_text())
    verdict = data["verdict"]
    return {"status": verdict["status"], "exit_code": verdict["exit_code"], "headline": data["headline"]["text"],
            "reasons": verdict["reasons"], "report": str(display_path(report_dir / "loadtest.md"))}


def summary(result: DemoResult, fleet: Fleet) -> str:
    inv = result.inventory
    verdict = result.verdict
    lines = [f"gpufleet demo: the chain ran in {clock(result.seconds)} on {inv}", ""]
    lines.append(f"  SLO gate      {verdict['status'].upper()} (exit {verdict['exit_code']}): {verdict['headline']}")
    lines += [f"                {reason}" for reason in verdict["reasons"][:5]]
    lines.append(f"  report        {verdict['report']} (with loadtest.json and the plots)")
    lines.append(f"  step logs     {display_path(Path(result.run_dir) / 'logs')}/")
    lines.append("")
    for name, url in result.urls.items():
        lines.append(f"  {name:<13} {url}")
    grafana_hosts = list(fleet.in_group("monitoring"))
    if grafana_hosts:
        container = grafana_hosts[0].config.ansible_host or grafana_hosts[0].name
        lines.append(f"  {'':<13} user admin, password: docker exec {container} cat /etc/grafana/admin_password")
    keys = next((fleet.root / h.config.gateway.api_keys_file for h in fleet.hosts if h.gateway is not None), None)
    gateway_url = next((url for name, url in result.urls.items() if name.startswith("gateway ")), None)
    if keys is not None and gateway_url:
        lines.append("")
        lines.append(f"  try the API   KEY=$(awk '$1==\"{bed.TESTBED_CLIENT}\" {{print $2}}' {display_path(keys)})")
        lines.append(f"                curl -s {gateway_url}/v1/models -H \"Authorization: Bearer $KEY\"")
    lines.append(f"  Locust web UI {display_path(BIN)}/gpufleet loadtest {inv} --web   (then http://127.0.0.1:8089)")
    minutes = len(SEED_CONCURRENCY) * (DEFAULT_WARMUP_S + DEFAULT_MEASURE_S) / 60
    lines.append(f"  the seed ramp make loadtest   (concurrency {levels_text(SEED_CONCURRENCY)}, "
                 f"{SEED_INPUT_LENGTHS[0]}/{SEED_OUTPUT_TOKENS} tokens, {DEFAULT_MEASURE_S:g} s measured per step: "
                 f"~{minutes:.0f} minutes; client {LOADTEST_CLIENT!r})")
    lines.append("  remove it all make demo-down")
    return "\n".join(lines)


def up(inventory: Path, ramp: Sequence[str] = DEMO_RAMP, reports: Path = REPORTS, stream=None) -> int:
    """Run the chain; the gate's exit code (0 pass, 1 an SLO failed), 2 when a step could not run."""
    stream = stream or sys.stdout
    fleet = load_fleet(inventory, check_secrets=False)
    check_test_bed(fleet)
    check_ramp(inventory, ramp)
    gateway = first_gateway(fleet)
    started = datetime.now(timezone.utc)
    run_dir = reports / f"demo-{started:%Y%m%dT%H%M%SZ}"
    steps = chain(inventory, run_dir, ramp, gateway)
    result = DemoResult(str(display_path(inventory)), str(display_path(run_dir)), started.isoformat())
    print(f"gpufleet demo: {len(steps)} steps on {result.inventory}; logs in {result.run_dir}/logs/", file=stream)
    progress = Progress([s.title for s in steps], stream=stream)
    try:
        for index, step in enumerate(steps):
            log_path = run_dir / "logs" / f"{index + 1}-{step.name}.log"
            result.steps.append(run_step(step, log_path, progress, index))
    except StepFailed as exc:
        result.seconds = round(progress.close(), 1)
        _write_result(run_dir, result)
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    result.seconds = round(progress.close(), 1)
    fleet = load_fleet(inventory, check_secrets=False)  # keys made by the harness are in it now
    result.verdict = read_verdict(run_dir / "loadtest")
    result.urls = service_urls(fleet)
    _write_result(run_dir, result)
    print("\n" + summary(result, fleet), file=stream)
    return int(result.verdict["exit_code"])


def _write_result(run_dir: Path, result: DemoResult) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "demo.json").write_text(json.dumps(asdict(result), indent=1) + "\n")


def down(inventory: Path, everything: bool = False, stream=None) -> list[str]:
    """Remove the test bed of `inventory`; with `everything`, also the test bed's keys, images, image cache
    and the agent bundle the deploy built.
    What was removed, one line each."""
    stream = stream or sys.stdout
    fleet = load_fleet(inventory, check_secrets=False)
    check_test_bed(fleet)
    removed = [f"host {name}" for name in bed.host_containers(fleet) if testbed.host_state(name) is not None]
    bed.down(inventory)
    if everything:
        for path in sorted({fleet.root / h.config.gateway.api_keys_file for h in fleet.hosts if h.gateway is not None}):
            if path.exists():
                path.unlink()
                removed.append(f"keys file {display_path(path)}")
        removed += images.remove_images_and_cache()
        agent = AGENT_BUNDLE.parent  # site.py builds it from this checkout on every run
        if agent.exists():
            shutil.rmtree(agent)
            removed.append(f"agent bundle folder {display_path(agent)}")
    for line in removed or ["nothing: no test bed was up"]:
        print(f"removed {line}", file=stream)
    kept = "kept: the load test reports in reports/"
    if everything:
        kept += ", the virtualenv (make clean removes it), the apt packages and the Docker daemon"
    print(kept, file=stream)
    return removed
