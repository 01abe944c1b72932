"""What a load test loads, read from the inventory: the gateway's URL, the load test's key, the model,
whose SLOs, and the Prometheus that watches its GPUs.

The controller (the machine running `gpufleet loadtest`) is not an inventory host, so it reaches a
service at its specific bind address, or at `ansible_host` when it binds every address; a service
bound to loopback is reachable only on its own host, and the command says so instead of timing
out. On the test bed (`ansible_connection: docker`) a gateway is reached at the port the harness
published on this machine's 127.0.0.1, and a monitoring host shares this machine's network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.errors import ConfigError, Problem
from gpufleet.fleet import Fleet, FleetHost
from gpufleet.paths import ROLES_DIR, display_path
from gpufleet.planner.reach import host_port
from gpufleet.schema.units import parse_listen

LOADTEST_CLIENT = "loadtest"


@dataclass(frozen=True)
class LoadTarget:
    url: str  # where the load goes: http://address:port
    served_name: str  # the `model` of every request
    engine: str  # vllm, tgi or sim
    slo_host: str  # the host whose `slo` judges the run
    gateway: str | None = None  # the gateway host (None: --target named the URL)
    client: str | None = None
    api_key: str | None = field(default=None, repr=False)
    prometheus_url: str | None = None
    gpu_selector: str = ""  # PromQL labels of the GPUs behind the target
    notes: tuple[str, ...] = ()


def resolve(fleet: Fleet, gateway: str | None = None, client: str = LOADTEST_CLIENT, url: str | None = None,
            prometheus_url: str | None = None) -> LoadTarget:
    """The load target of `fleet` (`gateway` names one of several; `url` overrides the address only).

    Raises ConfigError (file, key, fix) when the inventory cannot give a target, a key or a model.
    """
    host = _gateway_host(fleet, gateway)
    assert host.gateway is not None and host.config.gateway is not None
    plan = host.gateway
    key = _client_key(fleet, host, client)
    backends = sorted({backend.host for backend in plan.backends})
    notes: list[str] = []
    if url is None:
        url = _gateway_url(host)
    prometheus = prometheus_url
    if prometheus is None:
        prometheus, note = _prometheus_url(fleet)
        if note:
            notes.append(note)
    selector = 'host=~"{}"'.format("|".join(backends)) if backends else ""
    return LoadTarget(url=url.rstrip("/"), served_name=plan.served_name, engine=plan.engine,
                      slo_host=backends[0] if backends else host.name, gateway=host.name, client=client,
                      api_key=key, prometheus_url=prometheus or None, gpu_selector=selector, notes=tuple(notes))


def _problem(host: FleetHost | None, key: str, message: str, fix: str) -> ConfigError:
    origin = host.source.defined_at if host is not None else None
    return ConfigError([Problem(file=origin.file if origin else None, line=origin.line if origin else None,
                                key=key, host=host.name if host else None, message=message, fix=fix)])


def _gateway_host(fleet: Fleet, name: str | None) -> FleetHost:
    gateways = sorted((h for h in fleet.hosts if h.gateway is not None), key=lambda h: h.name)
    if not gateways:
        raise _problem(None, "gateway", f"no host of {display_path(fleet.inventory.hosts_file)} is in the 'gateway' "
                       "group: a load test goes through a gateway", "add a gateway host to hosts.yml")
    if name is None:
        return gateways[0]
    for host in gateways:
        if host.name == name:
            return host
    raise _problem(None, "gateway", f"{name!r} is not a gateway host",
                   f"name one of: {', '.join(h.name for h in gateways)}")


def _client_key(fleet: Fleet, host: FleetHost, client: str) -> str:
    settings = host.config.gateway
    assert settings is not None
    inventory = display_path(fleet.root)
    keys_file = display_path(fleet.root / settings.api_keys_file)
    found = [k.key for k in host.api_keys if k.name == client]
    if not found:
        raise ConfigError([Problem(file=keys_file, key="", host=host.name,
                                   message=f"no API key for client {client!r}, which the load test sends",
                                   fix=f"gpufleet keys add {inventory} {client}; list it in gateway.unlimited_clients "
                                   "and deploy the gateway again (deploy/gateway.py), or pass --client NAME")])
    if client not in settings.unlimited_clients:
        origin = _inventory_origin(host, ("gateway", "unlimited_clients"), ("gateway", "api_keys_file"))
        raise ConfigError([Problem(
            file=origin.file, line=origin.line, key="gateway.unlimited_clients", host=host.name,
            message=f"client {client!r} is held to {settings.rate_per_second:g} requests/s and "
                    f"{settings.max_conns_per_key} connections per key: the load test would measure the rate limit",
            fix=f"add {client} to gateway.unlimited_clients and deploy the gateway again (deploy/gateway.py)")])
    return found[0]


def _inventory_origin(host: FleetHost, *keys: tuple[str, ...]) -> Any:
    """The first of `keys` set in the inventory itself (not a role's defaults), else where the host is defined."""
    for key in keys:
        origin = host.source.origin_of(key)
        if origin is not None and not Path(origin.file).is_relative_to(display_path(ROLES_DIR)):
            return origin
    return host.source.defined_at


def _gateway_url(host: FleetHost) -> str:
    settings = host.config.gateway
    assert settings is not None
    address, port = parse_listen(settings.listen)
    if host.config.ansible_connection == "docker":
        from gpufleet.testbed.bed import published_port  # the test bed harness, only for its hosts

        return f"http://127.0.0.1:{published_port(host, port)}"
    reached = controller_address(address, host)
    if reached is None:
        origin = _inventory_origin(host, ("gateway", "listen"))
        raise ConfigError([Problem(
            file=origin.file, line=origin.line, key="gateway.listen", host=host.name,
            message=f"the gateway listens on {settings.listen}, which only {host.name} itself reaches",
            fix=f"run the load test on {host.name}, or through a tunnel with --target URL")])
    return f"http://{host_port(reached, port)}"


def controller_address(bind: str, host: FleetHost) -> str | None:
    """Where the controller reaches a port `host` binds on `bind`; None when only the host itself can."""
    ip = ipaddress.ip_address(bind)
    if ip.is_loopback:
        return None
    if ip.is_unspecified:
        return host.config.ansible_host or host.name
    return bind


def _prometheus_url(fleet: Fleet) -> tuple[str | None, str | None]:
    for host in sorted(fleet.in_group("monitoring"), key=lambda h: h.name):
        monitoring = host.config.monitoring
        if monitoring is None:
            continue
        port = monitoring.ports.prometheus
        if host.config.ansible_connection == "docker":  # the test bed's monitoring host shares this network
            address = monitoring.listen_address
            local = "127.0.0.1" if ipaddress.ip_address(address).is_unspecified else address
            return f"http://{host_port(local, port)}", None
        reached = controller_address(monitoring.listen_address, host)
        if reached is None:
            return None, (f"Prometheus on {host.name} listens on {monitoring.listen_address}, out of this machine's "
                          "reach: VRAM and GPU utilization are left out (give --prometheus URL, e.g. a tunnel)")
        return f"http://{host_port(reached, port)}", None
    return None, None
