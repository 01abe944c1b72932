"""Monitoring: pyinfra inventories/<fleet>/inventory.py deploy/monitoring.py

Every host gets node_exporter; GPU hosts the GPU exporter; gateway hosts the nginx and access-log
exporters; monitoring hosts Prometheus (targets and rules rendered from the inventory),
Alertmanager and Grafana. Run deploy/serving.py and deploy/gateway.py first so there is something
to scrape (deploy/site.py runs them all in order). Run from the repository root.
"""

from pyinfra import host

from gpufleet.hostops import runs_systemd
from roles import alertmanager, gateway_exporter, gpu_exporter, grafana, nginx_exporter, node_exporter, prometheus

fleet_host = host.data.gpufleet
if runs_systemd():
    node_exporter.apply()
    if fleet_host.in_group("gpu"):
        gpu_exporter.apply()
    if fleet_host.in_group("gateway"):
        nginx_exporter.apply()
        gateway_exporter.apply()
    if fleet_host.in_group("monitoring"):
        prometheus.apply()
        alertmanager.apply()
        grafana.apply()
