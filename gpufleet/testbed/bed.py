"""Bring the test bed of an inventory up and down: the mirror, and one host container per host.

The inventory is the single source: every host with `ansible_connection: docker` becomes a host
container named by its `ansible_host`, with the inventory's `gpus.count` simulated GPUs. The
mirror (stand-in packages and the layered check's image archive) goes to the cache folder.

    python -m gpufleet.testbed up [inventories/local]      # make testbed-up
    python -m gpufleet.testbed down [inventories/local]    # make testbed-down
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from gpufleet.apikeys import add_api_key, read_api_keys
from gpufleet.errors import ConfigError
from gpufleet.fleet import Fleet, FleetHost, load_fleet
from gpufleet.monitoring.targets import endpoints
from gpufleet.paths import REPO_ROOT
from gpufleet.planner.reach import host_port
from gpufleet.schema.units import parse_listen
from gpufleet.testbed import hosts as testbed
from gpufleet.testbed import images
from gpufleet.testbed.images import ImageError, cache_dir, log, run_command
from gpufleet.testbed.standin import StandinError, build_mirror

DEFAULT_INVENTORY = REPO_ROOT / "inventories" / "local"
TESTBED_CLIENT = "testbed"  # the client whose key `up` makes when a gateway has no keys file


def _mirror_path(url: str | None, what: str) -> Path:
    """Where in the mirror a file the inventory names by URL (http://127.0.0.1:8765/<path>) goes."""
    path = urlparse(url or "").path.lstrip("/")
    if not path:
        raise ValueError(f"{DEFAULT_INVENTORY}: {what} must be a URL on the test bed mirror, e.g. "
                         f"http://127.0.0.1:8765/images/<file>.tar")
    return Path(path)


def prepare_mirror(out: Path, *, sim_image: bool = False, inventory: Path = DEFAULT_INVENTORY) -> Path:
    """Stand-in packages plus the image archives the inventory's GPU hosts load, in `out`.

    The inventory is the single source of where the archives live (`container_toolkit.
    check_image_archive`, `engine.image_archive`) and which simulator image to save (`engine.image`).
    """
    config = next(h.config for h in load_fleet(inventory, check_secrets=False).hosts if h.in_group("gpu"))
    out.mkdir(parents=True, exist_ok=True)
    build_mirror(out)
    check = out / _mirror_path(config.container_toolkit.check_image_archive, "container_toolkit.check_image_archive")
    testbed.save_check_image(check)
    if sim_image:
        images.ensure_sim_image()
        archive = out / _mirror_path(config.engine.image_archive, "engine.image_archive")
        archive.parent.mkdir(parents=True, exist_ok=True)
        run_command(["docker", "save", "--output", str(archive), config.engine.image],
                    what=f"docker save {config.engine.image}", timeout=600)
    return out


def gateway_ports(fleet: Fleet) -> dict[str, list[int]]:
    """Test bed host name -> the gateway port to publish on this machine's loopback (gateway hosts)."""
    ports: dict[str, list[int]] = {}
    for fleet_host in fleet.hosts:
        if fleet_host.config.ansible_connection == "docker" and fleet_host.gateway is not None:
            ports[_host_name(fleet_host)] = [parse_listen(fleet_host.config.gateway.listen)[1]]
    return ports


def host_networks(fleet: Fleet) -> dict[str, testbed.HostNetwork]:
    """Test bed host name -> how it is reached: monitoring hosts on this machine's network, the hosts
    they scrape at a loopback address of their own with the scraped ports published there.

    Prometheus then reaches `ansible_host:port` exactly as on a real fleet (the monitoring host's
    /etc/hosts names each host's loopback address), and no traffic crosses Docker's bridge.
    Raises ValueError for a layout the test bed cannot build (a monitoring host that runs engines).
    """
    docker_hosts = [h for h in fleet.hosts if h.config.ansible_connection == "docker"]
    scrapers = [h for h in docker_hosts if h.in_group("monitoring")]
    if not scrapers:
        return {}
    for scraper in scrapers:
        if scraper.plan is not None:
            raise ValueError(f"{scraper.name}: on the test bed a monitoring host shares this machine's network and "
                             "cannot run a nested Docker; put the monitoring role on a host of its own")
    scraped: dict[str, set[int]] = {}
    for endpoint in endpoints(docker_hosts):
        if not endpoint.host.in_group("monitoring"):
            scraped.setdefault(endpoint.host.name, set()).add(endpoint.port)
    loopbacks = {h.name: testbed.loopback_address(_host_name(h)) for h in docker_hosts if h.name in scraped}
    names = tuple((h.config.ansible_host or h.name, loopbacks[h.name]) for h in docker_hosts if h.name in loopbacks)
    networks = {_host_name(h): testbed.HostNetwork(host_network=True, extra_hosts=names) for h in scrapers}
    for host in docker_hosts:
        if host.name in loopbacks:
            networks[_host_name(host)] = testbed.HostNetwork(loopback=loopbacks[host.name],
                                                             ports=tuple(sorted(scraped[host.name])))
    return networks


def monitoring_urls(fleet_host: FleetHost) -> list[tuple[str, str]]:
    """(service, URL) where a test bed monitoring host's services answer on this machine (it shares its network)."""
    monitoring = fleet_host.config.monitoring
    ports = monitoring.ports
    return [(name, f"http://{host_port(monitoring.listen_address, port)}") for name, port in
            (("Prometheus", ports.prometheus), ("Alertmanager", ports.alertmanager), ("Grafana", ports.grafana))]


def ensure_api_keys(fleet: Fleet, client: str = TESTBED_CLIENT) -> list[tuple[Path, str]]:
    """Keys the test bed needs and lacks: `client`'s where a keys file is missing, and one for each of the
    gateways' `unlimited_clients` (the load test's); (file, client) for each key made (files 0600)."""
    made = []
    for fleet_host in fleet.hosts:
        if fleet_host.gateway is None:
            continue
        settings = fleet_host.config.gateway
        path = fleet.root / settings.api_keys_file
        have = {key.name for key in read_api_keys(path)} if path.exists() else set()
        for name in ([] if have else [client]) + list(settings.unlimited_clients):
            if name not in have:
                add_api_key(path, name)
                have.add(name)
                made.append((path, name))
    return made


def published_port(fleet_host: FleetHost, port: int) -> int:
    """The port of this machine's 127.0.0.1 that reaches a test bed host's `port` (HostError if not published)."""
    container = fleet_host.config.ansible_host or fleet_host.name
    return testbed.TestbedHost(_host_name(fleet_host), container, 0).published(port)


def _host_name(fleet_host: FleetHost) -> str:
    container = fleet_host.config.ansible_host or fleet_host.name
    return container.removeprefix(testbed.container_name(""))


def host_containers(fleet: Fleet) -> dict[str, int]:
    """Test bed host name -> simulated GPUs, for the inventory's docker-connected hosts."""
    found: dict[str, int] = {}
    for fleet_host in fleet.hosts:
        config = fleet_host.config
        if config.ansible_connection != "docker":
            continue
        found[_host_name(fleet_host)] = config.gpus.count if config.gpus else 0
    return found


def up(inventory: Path) -> list[testbed.TestbedHost]:
    """Start the inventory's hosts; hosts already running are reused (a second `up` changes nothing).

    A stopped host (Docker restarted, the machine rebooted) is removed and made anew: its systemd
    and nested Docker state after an unclean stop is not worth trusting, and deploy/site.py
    converges a new host the same way.
    """
    fleet = load_fleet(inventory, check_secrets=False)
    wanted = host_containers(fleet)
    for path, client in ensure_api_keys(fleet):
        log(f"added a key for client {client!r} to {path} (gpufleet keys add to add more)")
    mirror = prepare_mirror(cache_dir() / "mirror", sim_image=True, inventory=inventory)
    states = {name: testbed.host_state(name) for name in wanted}
    running = [name for name, state in states.items() if state == "running"]
    stopped = [name for name, state in states.items() if state == "stopped"]
    if running:
        log(f"reusing the running host(s) {', '.join(running)} (make testbed-down first for new ones)")
    if stopped:
        log(f"removing the stopped host(s) {', '.join(stopped)} to start them anew")
        testbed.stop_hosts([testbed.TestbedHost(name, testbed.container_name(name), wanted[name]) for name in stopped])
    new = [name for name in wanted if name not in running]
    publish = gateway_ports(fleet)
    started = {host.name: host for host in testbed.start_hosts(
        new, mirror_dir=mirror, gpus={name: wanted[name] for name in new},
        publish={name: ports for name, ports in publish.items() if name in new},
        networks={name: network for name, network in host_networks(fleet).items() if name in new})}
    hosts = [started.get(name) or testbed.TestbedHost(name, testbed.container_name(name), wanted[name])
             for name in wanted]
    for host in hosts:
        for port in publish.get(host.name, []):
            log(f"{host.name}: gateway port {port} is http://127.0.0.1:{host.published(port)}")
    for fleet_host in fleet.in_group("monitoring"):
        urls = ", ".join(f"{name} {url}" for name, url in monitoring_urls(fleet_host))
        log(f"{fleet_host.name}: after deploy/site.py, {urls}")
    log(f"test bed up: {', '.join(h.container for h in hosts)}; "
        f"now: pyinfra -y {inventory}/inventory.py deploy/site.py")
    return hosts


def down(inventory: Path) -> None:
    fleet = load_fleet(inventory, check_secrets=False)
    testbed.stop_hosts([testbed.TestbedHost(name, testbed.container_name(name), gpus)
                        for name, gpus in host_containers(fleet).items()])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.testbed", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("inventory", nargs="?", type=Path, default=DEFAULT_INVENTORY)
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(args.inventory)
        else:
            down(args.inventory)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except (ImageError, StandinError, testbed.HostError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
