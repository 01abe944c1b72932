"""How one host reaches a port another host binds: the gateway's backends, Prometheus' targets.

A service bound to a specific address is reached there; one bound to every address (0.0.0.0, ::)
on the host's own loopback by itself and on its inventory address (`ansible_host`, else its name)
by the others; one bound to loopback by nobody else, which the planners refuse before any host is
contacted rather than deploy a gateway that answers 502 or a Prometheus whose targets are down.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fleet.py imports the planners
    from gpufleet.fleet import FleetHost


def reachable(bind: str, target: FleetHost, source: FleetHost) -> bool:
    """False when `target` binds to its loopback and `source` is another host."""
    return source.name == target.name or not ipaddress.ip_address(bind).is_loopback


def reach_address(bind: str, target: FleetHost, source: FleetHost) -> str:
    """The address `source` connects to for a port `target` binds on `bind` (check `reachable` first)."""
    if not ipaddress.ip_address(bind).is_unspecified:
        return bind
    if source.name == target.name:
        return "127.0.0.1"
    return target.config.ansible_host or target.name


def host_port(address: str, port: int) -> str:
    """address:port, with IPv6 addresses in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
