"""What each monitoring host's Prometheus scrapes, derived from the inventory and never listed by hand.

Every host runs node_exporter; GPU hosts the GPU exporter and their engine instances (one target
per instance, at the port the plan gives it); gateway hosts the nginx exporter and the gateway's
access-log exporter; monitoring hosts Prometheus and Alertmanager themselves. Each target carries
the `host` label (the inventory name) the rules, the inhibition and the dashboards select on.

Addresses follow gpufleet.planner.reach: a target bound to another host's loopback cannot be
scraped, and `target_problems` refuses that before any host is contacted, naming the key to set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.errors import Problem
from gpufleet.monitoring.jobs import (
    HOST_LABEL,
    JOB_ALERTMANAGER,
    JOB_ENGINE,
    JOB_GATEWAY,
    JOB_GPU_EXPORTER,
    JOB_NGINX,
    JOB_NODE,
    JOB_PROMETHEUS,
)
from gpufleet.planner.reach import host_port, reach_address, reachable

if TYPE_CHECKING:  # fleet.py imports this module
    from gpufleet.fleet import FleetHost

SELF_JOBS = (JOB_PROMETHEUS, JOB_ALERTMANAGER)
JOB_ORDER = (JOB_ENGINE, JOB_GPU_EXPORTER, JOB_NODE, JOB_NGINX, JOB_GATEWAY, JOB_PROMETHEUS, JOB_ALERTMANAGER)


@dataclass(frozen=True)
class Endpoint:
    """One port one host serves metrics on, before the scraping host's view of it is known."""

    job: str
    host: FleetHost
    bind: str  # the address the service binds to on its host
    port: int
    key: str  # the inventory key that sets `bind`, for refusals


@dataclass(frozen=True)
class Target:
    """One scrape target as a given Prometheus reaches it."""

    job: str
    host: str
    address: str  # host:port

    @property
    def labels(self) -> dict[str, str]:
        return {HOST_LABEL: self.host}


def endpoints(hosts: Sequence[FleetHost]) -> list[Endpoint]:
    """Every metrics endpoint of the fleet's hosts."""
    found: list[Endpoint] = []
    for host in hosts:
        monitoring = host.config.monitoring
        if monitoring is None:
            continue
        exporters = monitoring.exporter_address
        ports = monitoring.ports
        found.append(Endpoint(JOB_NODE, host, exporters, ports.node_exporter, "monitoring.exporter_address"))
        if host.plan is not None:
            found.append(Endpoint(JOB_GPU_EXPORTER, host, exporters, ports.gpu_exporter, "monitoring.exporter_address"))
            found += [Endpoint(JOB_ENGINE, host, host.config.engine.listen_address, instance.port,
                               "engine.listen_address") for instance in host.plan.instances]
        if host.gateway is not None:
            found.append(Endpoint(JOB_NGINX, host, exporters, ports.nginx_exporter, "monitoring.exporter_address"))
            found.append(Endpoint(JOB_GATEWAY, host, exporters, ports.gateway_exporter, "monitoring.exporter_address"))
        if host.in_group("monitoring"):
            listen = monitoring.listen_address
            found.append(Endpoint(JOB_PROMETHEUS, host, listen, ports.prometheus, "monitoring.listen_address"))
            found.append(Endpoint(JOB_ALERTMANAGER, host, listen, ports.alertmanager, "monitoring.listen_address"))
    return found


def scrape_targets(hosts: Sequence[FleetHost], scraper: FleetHost) -> list[Target]:
    """The targets `scraper`'s Prometheus scrapes, in job order then inventory order."""
    targets = [
        Target(e.job, e.host.name, host_port(reach_address(e.bind, e.host, scraper), e.port))
        for e in endpoints(hosts) if _scrapes(scraper, e) and reachable(e.bind, e.host, scraper)
    ]
    return sorted(targets, key=lambda t: JOB_ORDER.index(t.job))


def target_problems(hosts: Sequence[FleetHost]) -> list[Problem]:
    """One problem per (host, key) a monitoring host cannot scrape because it is bound to loopback."""
    scrapers = [h for h in hosts if h.in_group("monitoring") and h.config.monitoring is not None]
    problems: dict[tuple[str, str], Problem] = {}
    for scraper in scrapers:
        for endpoint in endpoints(hosts):
            if not _scrapes(scraper, endpoint) or reachable(endpoint.bind, endpoint.host, scraper):
                continue
            if (endpoint.host.name, endpoint.key) in problems:
                continue
            problems[(endpoint.host.name, endpoint.key)] = _unreachable(endpoint, scraper)
    return list(problems.values())


def _scrapes(scraper: FleetHost, endpoint: Endpoint) -> bool:
    """Every Prometheus scrapes every exporter, but only its own host's Prometheus and Alertmanager."""
    return endpoint.job not in SELF_JOBS or endpoint.host.name == scraper.name


def _unreachable(endpoint: Endpoint, scraper: FleetHost) -> Problem:
    host = endpoint.host
    origin = host.source.origin_of(tuple(endpoint.key.split("."))) or host.source.defined_at
    what = {"engine.listen_address": "engines' metrics", "monitoring.listen_address": "monitoring services"}.get(
        endpoint.key, "exporters")
    return Problem(
        file=origin.file, line=origin.line, key=endpoint.key, host=host.name,
        message=f"Prometheus on {scraper.name} cannot scrape {host.name}'s {what}: they listen on {endpoint.bind}, "
        f"which only {host.name} itself reaches",
        fix=f"set {endpoint.key} to {host.name}'s private address (host_vars/{host.name}.yml)",
    )


def jobs_of(targets: Iterable[Target]) -> dict[str, list[Target]]:
    """Targets grouped by job, jobs in JOB_ORDER."""
    grouped: dict[str, list[Target]] = {}
    for target in targets:
        grouped.setdefault(target.job, []).append(target)
    return grouped
