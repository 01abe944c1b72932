"""The Prometheus scrape jobs and target labels the rules select on.

The Prometheus role's scrape configs must use exactly these job names and give every target
these labels, so the rules, the alerts' inhibition (which matches on `host`) and the dashboards
find their series: import them from here rather than writing them again.
"""

from __future__ import annotations

JOB_ENGINE = "gpufleet-engine"  # every engine instance's /metrics (vLLM, TGI or the simulator), GPU hosts
JOB_GPU_EXPORTER = "gpufleet-gpu-exporter"  # `gpufleet exporter` on every GPU host
JOB_NODE = "node"  # node_exporter on every host
JOB_NGINX = "nginx"  # nginx-prometheus-exporter (stub_status) on gateway hosts
JOB_GATEWAY = "gpufleet-gateway"  # `gpufleet gateway-exporter` (the access log: answers by status) on gateway hosts

HOST_LABEL = "host"  # the inventory's host name, on every target
INSTANCE_LABEL = "instance"  # address:port of the target, as Prometheus sets it

JOB_PROMETHEUS = "prometheus"  # each monitoring host's Prometheus, scraping itself
JOB_ALERTMANAGER = "alertmanager"  # each monitoring host's Alertmanager

ALL_JOBS = (JOB_ENGINE, JOB_GPU_EXPORTER, JOB_NODE, JOB_NGINX, JOB_GATEWAY, JOB_PROMETHEUS, JOB_ALERTMANAGER)
