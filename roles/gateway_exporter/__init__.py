"""Role gateway_exporter: the gateway's answers by status code, from nginx's JSON access log.

`gpufleet gateway-exporter` (docs/gateway-exporter.md) follows the log roles/gateway writes and
serves `gpufleet_gateway_requests_total{model_name, status, client}` and the request duration
histograms on `monitoring.exporter_address`. The availability SLO and the gateway's 5xx and 429
alerts read it. It runs as the agent's unprivileged service user, in group adm to read the log.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from gpufleet.planner.reach import host_port
from roles import agent
from roles.gateway import PATHS

SERVICE = "gpufleet-gateway-exporter"


@deploy("gateway exporter")
def apply() -> None:
    fleet_host = host.data.gpufleet
    monitoring = fleet_host.config.monitoring
    command = [
        "gateway-exporter",
        "--log", PATHS.access_log,
        "--listen", host_port(monitoring.exporter_address, monitoring.ports.gateway_exporter),
        "--model-name", fleet_host.gateway.served_name,
    ]  # fmt: skip
    uploaded = agent.install()
    agent.service(SERVICE, "gpufleet gateway exporter (nginx access log)", command, uploaded, groups=["adm"])
