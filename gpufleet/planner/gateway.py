"""Plan each gateway host: which engine instances it fronts, at which addresses, and its global cap.

Computed with the rest of the fleet's plan, before any host is contacted, so a gateway that could
not reach its engines (engines published on another host's loopback) or that would mix models is
refused with the keys to change, instead of deploying an nginx that answers 502.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.errors import Problem
from gpufleet.planner.reach import host_port, reach_address, reachable

if TYPE_CHECKING:  # fleet.py imports this module
    from gpufleet.apikeys import ApiKey
    from gpufleet.fleet import FleetHost

# what nginx's map and limit zones can hold verbatim: no quotes, spaces, ';' or '$' (a variable)
_SAFE_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_SAFE_KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")


@dataclass(frozen=True)
class Backend:
    """One engine instance behind a gateway."""

    host: str
    instance: int
    address: str  # as the gateway reaches it
    port: int
    max_num_seqs: int

    @property
    def server(self) -> str:
        return host_port(self.address, self.port)


@dataclass(frozen=True)
class GatewayPlan:
    """What one gateway host serves: one model over its backends, and the requests it lets in at once."""

    served_name: str
    engine: str
    backends: tuple[Backend, ...]
    max_concurrency: int
    derived_cap: bool  # True when max_concurrency came from the plan, not the inventory


def plan_gateways(hosts: Sequence[FleetHost]) -> tuple[dict[str, GatewayPlan], list[Problem]]:
    """A plan per gateway host, or the problems that stop one."""
    gpu_hosts = [h for h in hosts if h.plan is not None]
    gateways = [h for h in hosts if h.in_group("gateway") and h.config.gateway is not None]
    fleet_gateways = sum(1 for g in gateways if g.config.gateway.backends == "fleet")
    plans: dict[str, GatewayPlan] = {}
    problems: list[Problem] = []
    for gateway in gateways:
        settings = gateway.config.gateway
        if settings.backends == "local":
            if gateway.plan is None:
                problems.append(_problem(gateway, "gateway.backends",
                                         "is 'local', but this host runs no engines (it is not in group 'gpu')",
                                         "set gateway.backends: fleet, or put the host in group 'gpu'"))
                continue
            fronted, sharing = [gateway], 1
        else:
            fronted, sharing = gpu_hosts, fleet_gateways
        if not fronted:
            problems.append(_problem(gateway, "gateway.backends", "no host of group 'gpu' is in the inventory, "
                                     "so the gateway would have nothing to serve", "add GPU hosts to group 'gpu'"))
            continue
        found = _backend_problems(gateway, fronted)
        if found:
            problems.extend(found)
            continue
        backends = tuple(
            Backend(host=h.name, instance=inst.index, port=inst.port, max_num_seqs=inst.plan.max_num_seqs,
                    address=reach_address(h.config.engine.listen_address, h, gateway))
            for h in fronted for inst in h.plan.instances
        )
        # requests beyond what the engines run at once would only wait in their queues: refuse them
        derived = math.ceil(sum(b.max_num_seqs for b in backends) / sharing)
        plans[gateway.name] = GatewayPlan(
            served_name=fronted[0].plan.served_name, engine=fronted[0].plan.engine, backends=backends,
            max_concurrency=settings.max_concurrency or derived, derived_cap=settings.max_concurrency is None,
        )
    return plans, problems


def api_key_problems(keys: Sequence[ApiKey], keys_file: str) -> list[Problem]:
    """Names and keys nginx can hold verbatim in its key map and limit zones."""
    problems = []
    for key in keys:
        if not _SAFE_NAME.fullmatch(key.name):
            problems.append(Problem(file=keys_file, key="", message=f"client name {key.name!r} has characters the "
                                    "gateway cannot use (letters, digits and . _ @ + - only, at most 64)",
                                    fix="rename the client in the keys file"))
        if not _SAFE_KEY.fullmatch(key.key):
            problems.append(Problem(file=keys_file, key="", message=f"the key of {key.name!r} has characters the "
                                    "gateway cannot match (quotes, spaces, ';', '$', ...)",
                                    fix=f"issue a new one: gpufleet keys add <inventory> {key.name} --replace"))
    return problems


def _backend_problems(gateway: FleetHost, fronted: Sequence[FleetHost]) -> list[Problem]:
    problems = []
    names = {h.plan.served_name for h in fronted}
    if len(names) > 1:
        which = ", ".join(f"{h.plan.served_name} on {h.name}" for h in fronted)
        problems.append(_problem(gateway, "gateway.backends",
                                 f"would front hosts serving different models ({which}); a gateway serves one model",
                                 "serve one model on the GPU hosts, or run a gateway on each GPU host "
                                 "(gateway.backends: local) and route clients per model"))
    for host in fronted:
        address = host.config.engine.listen_address
        if not reachable(address, host, gateway):
            origin = host.source.origin_of(("engine", "listen_address")) or host.source.defined_at
            problems.append(Problem(
                file=origin.file, line=origin.line, key="engine.listen_address", host=host.name,
                message=f"the gateway on {gateway.name} cannot reach {host.name}'s engines: they are published on "
                f"{address}, which only {host.name} itself reaches",
                fix=f"set engine.listen_address to {host.name}'s private address (host_vars/{host.name}.yml), "
                "or run a gateway on every GPU host with gateway.backends: local",
            ))
    return problems


def _problem(host: FleetHost, key: str, message: str, fix: str) -> Problem:
    origin = host.source.origin_of(tuple(key.split("."))) or host.source.defined_at
    return Problem(file=origin.file, line=origin.line, key=key, host=host.name, message=message, fix=fix)
