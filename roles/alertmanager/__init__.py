"""Role alertmanager: Alertmanager on the monitoring hosts, with the fleet's receivers and inhibition.

alertmanager.yml is gpufleet/monitoring/alertmanager.py's rendering of the inventory (receivers
from `monitoring.receivers`, grouping by alert and host, HostDown silencing its host's other
alerts); `amtool check-config` must accept it before Alertmanager reloads. Clustering is off: each
monitoring host's Prometheus sends to its own Alertmanager, and no gossip port is opened.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from gpufleet.hostops import packaged_service
from gpufleet.monitoring.alertmanager import render_alertmanager
from gpufleet.monitoring.render import source_name
from gpufleet.planner.reach import host_port

PACKAGE = "prometheus-alertmanager"
CONFIG = "/etc/prometheus/alertmanager.yml"
STORAGE = "/var/lib/prometheus/alertmanager/"


@deploy("alertmanager")
def apply() -> None:
    fleet, monitoring = host.data.gpufleet_fleet, host.data.gpufleet.config.monitoring
    args = [
        f"--config.file={CONFIG}",
        f"--storage.path={STORAGE}",
        f"--web.listen-address={host_port(monitoring.listen_address, monitoring.ports.alertmanager)}",
        "--cluster.listen-address=",
    ]
    configs = {CONFIG: render_alertmanager(fleet, source=source_name(fleet.root))}
    packaged_service(PACKAGE, args, configs, check=f"amtool check-config {CONFIG} >/dev/null")
