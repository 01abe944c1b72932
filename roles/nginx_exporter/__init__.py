"""Role nginx_exporter: nginx's connection counters (stub_status) on gateway hosts.

Debian's and Ubuntu's prometheus-nginx-exporter reads the gateway's stub_status, which nginx
serves on the host's loopback only (gateway.status_port), and serves `nginx_up` and the connection
counters on `monitoring.exporter_address`. GatewayDown reads `nginx_up`. The answers by status code
come from the access log instead (roles/gateway_exporter): stub_status has none.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from gpufleet.hostops import packaged_service
from gpufleet.planner.reach import host_port

PACKAGE = "prometheus-nginx-exporter"


@deploy("nginx exporter")
def apply() -> None:
    config = host.data.gpufleet.config
    listen = host_port(config.monitoring.exporter_address, config.monitoring.ports.nginx_exporter)
    stub_status = f"http://127.0.0.1:{config.gateway.status_port}/stub_status"
    packaged_service(PACKAGE, [f"-web.listen-address={listen}", f"-nginx.scrape-uri={stub_status}"])
