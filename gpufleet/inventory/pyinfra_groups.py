"""Hand a validated fleet to pyinfra as inventory groups.

pyinfra 3 has no YAML inventory; an `inventory.py` beside hosts.yml calls `pyinfra_groups` and
publishes the result as module globals, which pyinfra reads as groups. Ansible's connection
variables become pyinfra's SSH settings, and each host carries its validated `FleetHost` (its
typed configuration and capacity plan) as `host.data.gpufleet`, so roles read one source.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gpufleet.errors import EXIT_CONFIG_ERROR, ConfigError
from gpufleet.fleet import Fleet, FleetHost, load_fleet

HostEntry = tuple[str, dict[str, Any]]


def connection_data(host: FleetHost, fleet: Fleet | None = None) -> tuple[str, dict[str, Any]]:
    """pyinfra's host name (with its connector) and connection data for one host.

    `gpufleet_fleet` is the whole fleet, for the roles that configure one host from all the others
    (Prometheus' scrape targets, the rules).
    """
    config = host.config
    data: dict[str, Any] = {"gpufleet": host, "gpufleet_name": host.name, "gpufleet_fleet": fleet}
    if config.ansible_connection == "local":
        return "@local", data
    if config.ansible_connection == "docker":
        return f"@docker/{config.ansible_host or host.name}", data
    mapping = {
        "ssh_hostname": config.ansible_host,
        "ssh_port": config.ansible_port,
        "ssh_user": config.ansible_user,
        "ssh_key": config.ansible_ssh_private_key_file,
        "_sudo": config.ansible_become,
    }
    data.update({k: v for k, v in mapping.items() if v is not None})
    return host.name, data


def fleet_groups(fleet: Fleet) -> dict[str, list[HostEntry]]:
    """Every inventory group (except `all`, which pyinfra builds) with its hosts and their data."""
    entries = {host.name: connection_data(host, fleet) for host in fleet.hosts}
    groups: dict[str, list[HostEntry]] = {}
    for name in fleet.inventory.groups:
        if name == "all":
            continue
        members = [entries[h.name] for h in fleet.hosts if name in h.groups]
        if members:
            groups[name] = members
    return groups


def pyinfra_groups(inventory_file: str) -> dict[str, list[HostEntry]]:
    """Load the fleet beside `inventory_file`; on a bad inventory print the problems and exit 2."""
    try:
        fleet = load_fleet(Path(inventory_file).resolve().parent)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    return fleet_groups(fleet)
