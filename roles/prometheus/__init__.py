"""Role prometheus: Prometheus on the monitoring hosts, its targets and rules rendered from the inventory.

prometheus.yml lists every engine instance, exporter and gateway of the fleet as this host reaches
them (gpufleet/monitoring/targets.py); the rules are gpufleet/monitoring/rules.py's rendering of
the same fleet, so a changed SLO or GPU layout changes what is deployed. `promtool check config`
(which checks the rule files too) must accept both before Prometheus reloads them.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from gpufleet.hostops import packaged_service
from gpufleet.monitoring.prometheus_config import render_prometheus
from gpufleet.monitoring.render import source_name
from gpufleet.monitoring.rules import RUNBOOK_BASE, render_rules
from gpufleet.planner.reach import host_port

PACKAGE = "prometheus"
CONFIG = "/etc/prometheus/prometheus.yml"
RULES = "/etc/prometheus/rules/gpufleet.rules.yml"
STORAGE = "/var/lib/prometheus/metrics2/"


@deploy("prometheus")
def apply() -> None:
    fleet, fleet_host = host.data.gpufleet_fleet, host.data.gpufleet
    monitoring = fleet_host.config.monitoring
    source = source_name(fleet.root)
    args = [
        f"--config.file={CONFIG}",
        f"--storage.tsdb.path={STORAGE}",
        f"--storage.tsdb.retention.time={monitoring.retention_days}d",
        f"--web.listen-address={host_port(monitoring.listen_address, monitoring.ports.prometheus)}",
    ]
    runbooks = (monitoring.runbook_base_url or RUNBOOK_BASE).rstrip("/")
    configs = {
        RULES: render_rules(fleet, source=source, runbook_base=runbooks),
        CONFIG: render_prometheus(fleet, fleet_host.name, [RULES], source),
    }
    packaged_service(PACKAGE, args, configs, check=f"promtool check config {CONFIG} >/dev/null")
