"""Role node_exporter: the host's CPU, memory, disk and network metrics, on every host of the fleet.

Debian's and Ubuntu's prometheus-node-exporter, bound to `monitoring.exporter_address` (loopback
unless Prometheus runs on another host). HostDown, HostMemoryHigh and HostDiskSpaceLow read it, and
HostDown's inhibition silences the host's other alerts while it is unreachable.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from gpufleet.hostops import packaged_service
from gpufleet.planner.reach import host_port

PACKAGE = "prometheus-node-exporter"


@deploy("node exporter")
def apply() -> None:
    monitoring = host.data.gpufleet.config.monitoring
    listen = host_port(monitoring.exporter_address, monitoring.ports.node_exporter)
    packaged_service(PACKAGE, [f"--web.listen-address={listen}"])
