"""Rolling update of the engine containers: one instance at a time across the whole fleet.

For each instance whose spec changed (image, model, flags, limits), in fleet order:
1. every gateway fronting it marks it `down` in its upstream and reloads nginx (graceful: old
   workers finish their streams, new requests go to the other instances);
2. on its GPU host, once the engine has no request running or waiting, the old container is
   stopped and kept as `<name>-previous`, the new one created, and it must become healthy and
   answer a smoke completion;
3. the gateways put it back.
A new container that fails step 2 is removed and the previous one renamed back and started: the
instance serves its old spec again, the gateways put it back, and the rollout stops there (every
later instance keeps its old spec) and fails with the new container's last log lines.

pyinfra runs an operation on every host before the next operation. Every host therefore gets
every step's operations, in the same order (they do nothing on hosts the step is not about), so
the steps form one chain: a gateway never puts an instance back before its host replaced it, and
never drains the next before the previous is back. Outcomes cross hosts through `RUN`, which
lives in the pyinfra process for the one run.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import StringIO
from typing import Any

import gevent
from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations import files

from gpufleet.hostops import executing, fail_host, logger
from roles import inference
from roles.gateway.nginx_conf import GatewayPaths, render_upstream
from roles.inference.spec import ContainerSpec

DRAIN_TIMEOUT_S = 900  # the longest generation we wait for before replacing an instance anyway
STOP_TIMEOUT_S = 30
POLL_S = 1.0
PREVIOUS_SUFFIX = "-previous"
GATEWAY_PATHS = GatewayPaths()

# what each engine reports as requests running and waiting, summed to decide it is idle
_BUSY_METRICS = {
    "vllm": "^vllm:num_requests_(running|waiting)",
    "sim": "^vllm:num_requests_(running|waiting)",
    "tgi": "^tgi_(batch_current_size|queue_size)",
}


@dataclass(frozen=True)
class Step:
    """One instance to roll: its GPU host and the gateway hosts that front it."""

    host: str
    instance: int
    server: str  # the instance's address in the gateways' upstreams
    gateways: tuple[str, ...]


@dataclass
class RolloutRun:
    failed: str | None = None  # why the rollout stopped, once it has
    replaced: int = 0


RUN = RolloutRun()


def rollout_steps(fleet_hosts: Sequence[Any]) -> list[Step]:
    """Every instance of every GPU host in inventory order, with the gateways fronting it."""
    steps = []
    for gpu_host in (h for h in fleet_hosts if h.plan is not None):
        for instance in gpu_host.plan.instances:
            fronting = [
                (g.name, b.server) for g in fleet_hosts if g.gateway is not None
                for b in g.gateway.backends if b.host == gpu_host.name and b.instance == instance.index
            ]
            server = fronting[0][1] if fronting else ""
            steps.append(Step(gpu_host.name, instance.index, server, tuple(name for name, _ in fronting)))
    return steps


def needs_update(spec: ContainerSpec, on: Any) -> bool:
    """The instance's container is missing, stopped, or of another spec (read on its own host)."""
    state = inference.container_state(spec.name, on=on)
    return state is None or state[0] != spec.spec_hash or not state[1]


@operation()
def instance_drained(step: Step, on: Any) -> Iterator[Any]:
    """On a gateway fronting the step's instance about to be replaced: mark it down and reload."""
    if host.data.gpufleet_name not in step.gateways or RUN.failed:
        return
    if not needs_update(inference.host_specs(on)[step.instance], on):
        return
    yield from _upstream(drained=(step.server,))


@operation()
def instance_replaced(step: Step, kind: str, served_name: str) -> Iterator[Any]:
    """On the step's GPU host: replace the container when its spec changed; roll back on failure."""
    if host.data.gpufleet_name != step.host or RUN.failed:
        return
    spec = inference.host_specs(host)[step.instance]
    if not needs_update(spec, host):
        return
    yield FunctionCommand(_replace, (spec, kind, served_name), {})


@operation()
def instance_restored(step: Step) -> Iterator[Any]:
    """On a gateway fronting the step's instance: every instance in rotation again."""
    if host.data.gpufleet_name in step.gateways:
        yield from _upstream(drained=())


@operation()
def rollout_refused(left_out: list[str]) -> Iterator[Any]:
    if executing():
        yield fail_host(f"the gateways {', '.join(left_out)} front instances this rollout replaces but are not "
                        "in the run, so they could not take them out of rotation\n"
                        f"  fix: add them to --limit (e.g. --limit <gpu-host>,{','.join(left_out)})")


@operation()
def rollout_verdict() -> Iterator[Any]:
    """Fail every host of the run when an instance had to be rolled back."""
    if executing() and RUN.failed:
        yield fail_host(f"rollout stopped: {RUN.failed}")


def _upstream(drained: tuple[str, ...]) -> Iterator[Any]:
    fleet_host = host.data.gpufleet
    text = render_upstream(fleet_host.gateway, fleet_host.config.gateway, drained)
    current = host.get_fact(FileContents, path=GATEWAY_PATHS.upstream)
    if current is not None and "\n".join(current) + "\n" == text:
        return
    yield from files.put._inner(src=StringIO(text), dest=GATEWAY_PATHS.upstream, mode="644")
    # reload is graceful: old workers finish their requests; give the new ones a moment to start
    yield "nginx -t -q && nginx -s reload && sleep 1"


def _run(on: Any, command: str) -> tuple[bool, str]:
    ok, output = on.run_shell_command(StringCommand(command), print_output=False, print_input=False)
    return ok, output.output


def _busy(on: Any, spec: ContainerSpec, kind: str) -> int | None:
    ok, out = _run(on, f"curl -sf {spec.url}/metrics | "
                       f"awk '/{_BUSY_METRICS[kind]}/ {{s += $2}} END {{print s + 0}}'")
    try:
        return int(float(out.strip().splitlines()[-1])) if ok and out.strip() else None
    except ValueError:
        return None


def _wait_idle(on: Any, spec: ContainerSpec, kind: str) -> None:
    """Until the engine has nothing running or waiting (its streams, drained by the gateway, ended)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _busy(on, spec, kind):  # 0, or no answer: a dead engine has nothing left to drain
            return
        gevent.sleep(POLL_S)
    on.log(f"{spec.name}: still busy after {DRAIN_TIMEOUT_S}s; replacing it anyway")


def _replace(state: Any, host: Any, spec: ContainerSpec, kind: str, served_name: str) -> bool:
    # pyinfra passes state and host to a FunctionCommand only when its parameters are so named
    on = host
    previous = spec.name + PREVIOUS_SUFFIX
    exists, _ = _run(on, f"docker inspect --format ok {spec.name}")
    _run(on, f"docker rm -f {previous}")
    if exists:
        _wait_idle(on, spec, kind)
        ok, out = _run(on, f"docker stop -t {STOP_TIMEOUT_S} {spec.name} && docker rename {spec.name} {previous}")
        if not ok:
            return _stopped(on, f"could not stop {spec.name}: {out}")
    create = " ".join(shlex.quote(arg) for arg in spec.create_args())
    ok, out = _run(on, f"{create} && docker start {spec.name}")
    problem = (
        (None if ok else f"docker could not start it: {out[-2000:]}")
        or inference.wait_healthy(spec, inference.HEALTHY_TIMEOUT_S)
        or inference.smoke_completion(spec, served_name)
    )
    if problem is None:
        _run(on, f"docker rm -f {previous}")
        RUN.replaced += 1
        return True
    restored = "there was no previous container to restore"
    if exists:
        _run(on, f"docker rm -f {spec.name}")
        ok, _ = _run(on, f"docker rename {previous} {spec.name} && docker start {spec.name}")
        back = ok and inference.wait_healthy(spec, inference.HEALTHY_TIMEOUT_S) is None
        restored = "the previous container serves again" if back else "the previous container did not come back"
    return _stopped(on, f"instance {spec.instance}: the new spec failed ({problem.strip()}); {restored}")


def _stopped(on: Any, why: str) -> bool:
    """Record why the rollout stops. The host is not failed here: its gateway (often itself) must
    still put the instance back; rollout_verdict fails the run at the end."""
    RUN.failed = f"{on.data.gpufleet_name} {why}"
    on.log_styled(RUN.failed, fg="red", log_func=logger.error)
    return True


def apply() -> None:
    """The rollout's operations, the same chain on every host of the run (see the module's doc)."""
    inventory = host.state.inventory
    members = {h.data.gpufleet_name: h for h in inventory}
    fleet_hosts = [h.data.gpufleet for h in inventory]
    in_run = host.state.is_host_in_limit
    steps = [s for s in rollout_steps(fleet_hosts) if in_run(members[s.host])]  # --limit picks GPU hosts
    left_out = sorted({g for s in steps for g in s.gateways if not in_run(members[g])})
    if left_out:
        rollout_refused(name="gateways in the run", left_out=left_out)
        return
    for step in host.loop(steps):
        on = members[step.host]
        where = f"{step.host} instance {step.instance}"
        instance_drained(name=f"{where}: out of the gateways", step=step, on=on)
        instance_replaced(name=f"{where}: replaced", step=step, kind=on.data.gpufleet.plan.engine,
                          served_name=on.data.gpufleet.plan.served_name)
        instance_restored(name=f"{where}: back in the gateways", step=step)
    rollout_verdict(name="rollout verdict")
